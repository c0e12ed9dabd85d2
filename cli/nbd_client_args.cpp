// See nbd_client_args.h.
#include "cli/nbd_client_args.h"

#include <cctype>

namespace rpoint::cli {

namespace {

bool StartsWith(const std::string& s, const char* prefix, std::string* rest) {
  const std::string p(prefix);
  if (s.compare(0, p.size(), p) != 0) return false;
  *rest = s.substr(p.size());
  return true;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The daemon percent-encodes the socket path (restore/access_grants.cpp
// QueryEncode). control/url.h has a decoder, but the CLI may not depend on
// control/ (scripts/check_layering.py), and this is all it needs of it.
bool PercentDecode(const std::string& s, std::string* out) {
  out->clear();
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      *out += s[i];
      continue;
    }
    if (i + 2 >= s.size()) return false;
    const int hi = HexValue(s[i + 1]), lo = HexValue(s[i + 2]);
    if (hi < 0 || lo < 0) return false;
    *out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return true;
}

// A word nbd-client gets as one argument: non-empty, no whitespace, no
// leading '-' (it would be taken for an option).
bool PlainWord(const std::string& s) {
  if (s.empty() || s[0] == '-') return false;
  for (unsigned char c : s) {
    if (std::isspace(c) || std::iscntrl(c)) return false;
  }
  return true;
}

Status Bad(const std::string& why) {
  return Status::InvalidArgument("cannot make nbd-client arguments of this URI: " + why);
}

}  // namespace

Result<std::string> NbdClientArgs(const std::string& uri) {
  std::string rest;
  bool tls = false;
  if (StartsWith(uri, "nbd+unix:///", &rest) || (tls = StartsWith(uri, "nbds+unix:///", &rest))) {
    const size_t q = rest.find("?socket=");
    if (q == std::string::npos) return Bad("no ?socket= in a Unix URI");
    const std::string name = rest.substr(0, q);
    std::string path;
    if (!PercentDecode(rest.substr(q + 8), &path)) return Bad("bad percent-encoding");
    if (!PlainWord(name)) return Bad("the export name is empty or has whitespace");
    if (!PlainWord(path) || path.find('&') != std::string::npos) {
      return Bad("the socket path has whitespace or other parameters follow it");
    }
    return "-N " + name + " -unix " + path + (tls ? " -enable-tls" : "");
  }
  if (!StartsWith(uri, "nbd://", &rest) && !(tls = StartsWith(uri, "nbds://", &rest))) {
    return Bad("not an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI");
  }
  const size_t slash = rest.find('/');
  if (slash == std::string::npos) return Bad("no export name");
  const std::string authority = rest.substr(0, slash), name = rest.substr(slash + 1);
  std::string host, port;
  if (!authority.empty() && authority[0] == '[') {
    const size_t close = authority.find(']');
    if (close == std::string::npos) return Bad("unterminated IPv6 address");
    host = authority.substr(1, close - 1);
    if (authority.size() > close + 1) {
      if (authority[close + 1] != ':') return Bad("junk after the IPv6 address");
      port = authority.substr(close + 2);
    }
  } else {
    const size_t colon = authority.rfind(':');
    host = authority.substr(0, colon);
    if (colon != std::string::npos) port = authority.substr(colon + 1);
  }
  if (port.empty()) port = "10809";  // the URI default, and nbd-client's
  for (char c : port) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return Bad("the port is not a number");
  }
  if (!PlainWord(host)) return Bad("no host");
  // nbd-client has no PSK (user@host in libnbd URIs) and no other credentials.
  if (host.find('@') != std::string::npos) return Bad("nbd-client cannot log in as a user");
  if (!PlainWord(name) || name.find_first_of("?#") != std::string::npos) {
    return Bad("the export name is empty or has whitespace or a query");
  }
  return "-N " + name + " " + host + " " + port + (tls ? " -enable-tls" : "");
}

}  // namespace rpoint::cli
