#include "cli/size.h"

#include <cctype>
#include <cstdio>
#include <limits>

namespace rpoint::cli {

namespace {

const char kUnits[] = "BKMGTPE";

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

Result<uint64_t> ParseSize(const std::string& text) {
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument("invalid size '" + text + "': " + why);
  };
  size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  if (i == 0) return bad("expected a whole number with an optional unit (K, M, G, T, P), e.g. 10G");
  uint64_t value = 0;
  for (size_t k = 0; k < i; ++k) {
    uint64_t d = static_cast<uint64_t>(text[k] - '0');
    if (value > (std::numeric_limits<uint64_t>::max() - d) / 10) return bad("too large");
    value = value * 10 + d;
  }
  std::string unit = Lower(text.substr(i));
  int shift = -1;
  if (unit.empty() || unit == "b") {
    shift = 0;
  } else {
    static const char* const kNames[] = {"k", "m", "g", "t", "p"};
    for (int u = 0; u < 5; ++u) {
      if (unit == kNames[u] || unit == std::string(kNames[u]) + "i" ||
          unit == std::string(kNames[u]) + "ib") {
        shift = 10 * (u + 1);
      } else if (unit == std::string(kNames[u]) + "b") {
        return bad("'" + text.substr(i) + "' is ambiguous; use " +
                   static_cast<char>(std::toupper(kNames[u][0])) + " or " +
                   static_cast<char>(std::toupper(kNames[u][0])) + "iB (binary, 1024-based)");
      }
    }
  }
  if (shift < 0) return bad("unknown unit '" + text.substr(i) + "' (use K, M, G, T or P)");
  if (shift > 0 && value > (std::numeric_limits<uint64_t>::max() >> shift)) return bad("too large");
  return value << shift;
}

std::string FormatSize(uint64_t bytes) {
  int u = 0;
  while (u < 6 && bytes >= (uint64_t{1} << (10 * (u + 1)))) ++u;
  char buf[64];
  if (u == 0) {
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
    return buf;
  }
  uint64_t unit = uint64_t{1} << (10 * u);
  const char suffix[] = {kUnits[u], 'i', 'B', '\0'};
  if (bytes % unit == 0) {
    std::snprintf(buf, sizeof buf, "%llu %s", static_cast<unsigned long long>(bytes / unit), suffix);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f %s", static_cast<double>(bytes) / static_cast<double>(unit),
                  suffix);
    // "1.50 GiB" -> "1.5 GiB"
    std::string s = buf;
    size_t dot = s.find('.');
    size_t sp = s.find(' ');
    size_t end = sp;
    while (end > dot + 1 && s[end - 1] == '0') --end;
    if (end == dot + 1) end = dot;
    return s.substr(0, end) + s.substr(sp);
  }
  return buf;
}

}  // namespace rpoint::cli
