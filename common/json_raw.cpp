#include "common/json_raw.h"

#include <optional>
#include <random>
#include <utility>

namespace rpoint {

namespace {

using nlohmann::json;

constexpr size_t kNone = std::string_view::npos;

bool IsWs(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}
bool IsDigit(char c) {
  return c >= '0' && c <= '9';
}

size_t Ws(std::string_view t, size_t i) {
  while (i < t.size() && IsWs(t[i])) ++i;
  return i;
}

// At a '"': moves *i past the closing quote. The scanner below does not
// validate (ParseJson does that afterwards); it only has to find byte ranges
// without recursion and without running past the end.
bool SkipString(std::string_view t, size_t* i) {
  for (size_t j = *i + 1; j < t.size(); ++j) {
    if (t[j] == '\\') {
      ++j;
    } else if (t[j] == '"') {
      *i = j + 1;
      return true;
    }
  }
  return false;
}

// Moves *i past one value: a string, a container (bracket counting, not
// recursion), or a scalar token.
bool SkipValue(std::string_view t, size_t* i) {
  size_t j = *i;
  if (j >= t.size()) return false;
  if (t[j] == '"') return SkipString(t, i);
  if (t[j] == '{' || t[j] == '[') {
    size_t depth = 0;
    while (j < t.size()) {
      char c = t[j];
      if (c == '"') {
        if (!SkipString(t, &j)) return false;
        continue;
      }
      if (c == '{' || c == '[') {
        ++depth;
      } else if ((c == '}' || c == ']') && --depth == 0) {
        *i = j + 1;
        return true;
      }
      ++j;
    }
    return false;
  }
  while (j < t.size() && !IsWs(t[j]) && t[j] != ',' && t[j] != ']' && t[j] != '}') ++j;
  if (j == *i) return false;
  *i = j;
  return true;
}

// The byte range [first, second) of the value of the member at `path`, keys
// compared as written (an escaped key does not match; then nothing is raw).
std::optional<std::pair<size_t, size_t>> FindMemberSpan(std::string_view t,
                                                        const std::vector<std::string_view>& path) {
  size_t i = Ws(t, 0);
  if (path.empty()) {
    size_t start = i;
    if (!SkipValue(t, &i)) return std::nullopt;
    return std::make_pair(start, i);
  }
  for (size_t k = 0; k < path.size(); ++k) {
    if (i >= t.size() || t[i] != '{') return std::nullopt;
    i = Ws(t, i + 1);
    bool found = false;
    while (i < t.size() && t[i] == '"') {
      size_t key_start = i + 1;
      if (!SkipString(t, &i)) return std::nullopt;
      std::string_view key = t.substr(key_start, i - 1 - key_start);
      i = Ws(t, i);
      if (i >= t.size() || t[i] != ':') return std::nullopt;
      i = Ws(t, i + 1);
      size_t value_start = i;
      if (!SkipValue(t, &i)) return std::nullopt;
      if (key == path[k]) {
        if (k + 1 == path.size()) return std::make_pair(value_start, i);
        i = value_start;
        found = true;
        break;
      }
      i = Ws(t, i);
      if (i >= t.size() || t[i] != ',') return std::nullopt;
      i = Ws(t, i + 1);
    }
    if (!found) return std::nullopt;
  }
  return std::nullopt;
}

// The end of the JSON number (RFC 8259 grammar) starting at i, or kNone.
size_t NumberEnd(std::string_view t, size_t i) {
  size_t j = i;
  if (j < t.size() && t[j] == '-') ++j;
  if (j >= t.size()) return kNone;
  if (t[j] == '0') {
    ++j;
  } else if (IsDigit(t[j])) {
    while (j < t.size() && IsDigit(t[j])) ++j;
  } else {
    return kNone;
  }
  if (j < t.size() && t[j] == '.') {
    size_t d = ++j;
    while (j < t.size() && IsDigit(t[j])) ++j;
    if (j == d) return kNone;
  }
  if (j < t.size() && (t[j] == 'e' || t[j] == 'E')) {
    ++j;
    if (j < t.size() && (t[j] == '+' || t[j] == '-')) ++j;
    size_t d = j;
    while (j < t.size() && IsDigit(t[j])) ++j;
    if (j == d) return kNone;
  }
  return j;
}

// `t` with every valid number token in [begin, end) (outside strings) replaced
// by 0, so that the strict parser checks everything but the numbers' range.
// Anything else stays, for the parser to refuse.
std::string NeutraliseNumbers(std::string_view t, size_t begin, size_t end) {
  std::string out(t.substr(0, begin));
  size_t j = begin;
  while (j < end) {
    char c = t[j];
    if (c == '"') {
      size_t s = j;
      if (!SkipString(t, &j)) j = end;
      out.append(t.substr(s, j - s));
      continue;
    }
    if (c == '-' || IsDigit(c)) {
      // The whole run of number characters must be one valid number: "1e5.3"
      // or "--1" stay as they are (and are refused), never become "0.3", "-0".
      size_t run = j;
      while (run < end && (IsDigit(t[run]) || t[run] == '-' || t[run] == '+' || t[run] == '.' ||
                           t[run] == 'e' || t[run] == 'E')) {
        ++run;
      }
      if (NumberEnd(t, j) == run) {
        out += '0';
      } else {
        out.append(t.substr(j, run - j));
      }
      j = run;
      continue;
    }
    out += c;
    ++j;
  }
  out.append(t.substr(end));
  return out;
}

bool IsRaw(const json& j) {
  return j.is_binary() && j.get_binary().has_subtype() &&
         j.get_binary().subtype() == kRawJsonSubtype;
}

template <typename J>
void ReplaceRaw(J& j, const std::string& prefix, std::vector<std::string>* raws) {
  if (j.is_binary()) {
    const auto& b = j.get_binary();
    if (b.has_subtype() && b.subtype() == kRawJsonSubtype) {
      raws->emplace_back(b.begin(), b.end());
      j = prefix + std::to_string(raws->size() - 1);
    }
    return;
  }
  if (j.is_structured()) {
    for (auto& v : j) ReplaceRaw(v, prefix, raws);
  }
}

template <typename J>
std::string DumpJsonImpl(const J& in, int indent) {
  constexpr auto kReplace = J::error_handler_t::replace;
  // A marker no other string in the document can hold: the raw values are
  // out of the document while it is printed, and the rest are names and
  // values the daemon made, which never contain a fresh random nonce.
  std::random_device rd;
  std::string prefix = "rpoint-raw-json-";
  for (int i = 0; i < 4; ++i) prefix += std::to_string(rd()) + "-";
  J j = in;
  std::vector<std::string> raws;
  ReplaceRaw(j, prefix, &raws);
  std::string text = j.dump(indent, ' ', false, kReplace);
  if (raws.empty()) return text;
  std::string quoted = "\"" + prefix;
  std::string out;
  out.reserve(text.size());
  size_t pos = 0;
  for (;;) {
    size_t at = text.find(quoted, pos);
    if (at == std::string::npos) break;
    size_t digits = at + quoted.size();
    size_t close = text.find('"', digits);
    size_t index = std::stoul(text.substr(digits, close - digits));
    out.append(text, pos, at - pos);
    out += raws.at(index);
    pos = close + 1;
  }
  out.append(text, pos);
  return out;
}

}  // namespace

json RawJsonValue(std::string_view text) {
  // Always raw, even when a dump would print the same: a pretty-printed
  // response must not indent inside it either.
  return json::binary(std::vector<uint8_t>(text.begin(), text.end()), kRawJsonSubtype);
}

std::string RawJsonText(const json& value) {
  if (IsRaw(value)) {
    const auto& b = value.get_binary();
    return std::string(b.begin(), b.end());
  }
  return value.dump();
}

Result<json> ParseJsonKeepingRaw(std::string_view text, const std::vector<std::string_view>& path,
                                 size_t max_depth) {
  auto span = FindMemberSpan(text, path);
  if (!span) return ParseJson(text, max_depth);
  auto [begin, end] = *span;
  auto parsed = ParseJson(NeutraliseNumbers(text, begin, end), max_depth);
  if (!parsed.ok()) return parsed.status();
  json doc = std::move(parsed).value();
  json* at = &doc;
  for (std::string_view key : path) {
    if (!at->is_object()) return doc;  // cannot happen: the scanner found it
    auto it = at->find(std::string(key));
    if (it == at->end()) return doc;
    at = &*it;
  }
  *at = RawJsonValue(text.substr(begin, end - begin));
  return doc;
}

std::string DumpJson(const nlohmann::ordered_json& j, int indent) {
  return DumpJsonImpl(j, indent);
}
std::string DumpJson(const json& j, int indent) {
  return DumpJsonImpl(j, indent);
}

}  // namespace rpoint
