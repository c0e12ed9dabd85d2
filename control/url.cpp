#include "control/url.h"

namespace rpoint {

namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

const std::string* ParsedTarget::query_param(const std::string& name) const {
  for (const auto& [k, v] : query) {
    if (k == name) return &v;
  }
  return nullptr;
}

Result<std::string> PercentDecode(std::string_view s, bool plus_is_space) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c == '%') {
      if (i + 2 >= s.size() || HexValue(s[i + 1]) < 0 || HexValue(s[i + 2]) < 0) {
        return Status::InvalidArgument("bad percent-encoding in '" + std::string(s) + "'");
      }
      int hi = HexValue(s[i + 1]);
      int lo = HexValue(s[i + 2]);
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else if (c == '+' && plus_is_space) {
      out.push_back(' ');
    } else {
      out.push_back(c);
    }
  }
  if (out.find('\0') != std::string::npos) {
    return Status::InvalidArgument("NUL byte (%00) in '" + std::string(s) + "'");
  }
  return out;
}

Result<ParsedTarget> ParseTarget(std::string_view target) {
  if (target.empty() || target[0] != '/') {
    return Status::InvalidArgument("request target must be a path starting with '/'");
  }
  if (target.find('#') != std::string_view::npos) {
    return Status::InvalidArgument("request target must not contain a fragment ('#')");
  }
  ParsedTarget out;
  size_t q = target.find('?');
  std::string_view path = target.substr(0, q);
  out.path = std::string(path);
  if (path.size() > 1) {
    size_t start = 1;
    for (;;) {
      size_t slash = path.find('/', start);
      std::string_view seg = path.substr(start, slash == std::string_view::npos ? slash : slash - start);
      auto d = PercentDecode(seg, false);
      if (!d.ok()) return d.status();
      out.segments.push_back(std::move(d).value());
      if (slash == std::string_view::npos) break;
      start = slash + 1;
    }
  }
  if (q != std::string_view::npos) {
    std::string_view query = target.substr(q + 1);
    size_t start = 0;
    while (start <= query.size()) {
      size_t amp = query.find('&', start);
      std::string_view item =
          query.substr(start, amp == std::string_view::npos ? std::string_view::npos : amp - start);
      if (!item.empty()) {
        size_t eq = item.find('=');
        auto k = PercentDecode(item.substr(0, eq), true);
        if (!k.ok()) return k.status();
        std::string v;
        if (eq != std::string_view::npos) {
          auto dv = PercentDecode(item.substr(eq + 1), true);
          if (!dv.ok()) return dv.status();
          v = std::move(dv).value();
        }
        if (out.query_param(k.value()) != nullptr) {
          return Status::InvalidArgument("query parameter '" + k.value() + "' given more than once");
        }
        out.query.emplace_back(std::move(k).value(), std::move(v));
      }
      if (amp == std::string_view::npos) break;
      start = amp + 1;
    }
  }
  return out;
}

}  // namespace rpoint
