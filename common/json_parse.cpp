#include "common/json_parse.h"

#include <string>
#include <vector>

namespace rpoint {

namespace {

using nlohmann::json;

// Error messages quote what the client sent; keep them short.
std::string Excerpt(const std::string& s) {
  constexpr size_t kMax = 64;
  return s.size() <= kMax ? s : s.substr(0, kMax) + "...";
}

// A SAX handler that builds the document like nlohmann's own DOM parser, with
// a depth limit and duplicate-key and number checks. The stack holds the open
// containers; a pointer stays valid while it is on the stack because values
// are only ever added to the innermost open container.
class StrictBuilder {
 public:
  explicit StrictBuilder(size_t max_depth) : max_depth_(max_depth) {}

  bool null() { return put(nullptr) != nullptr; }
  bool boolean(bool v) { return put(v) != nullptr; }
  bool number_integer(json::number_integer_t v) { return put(v) != nullptr; }
  bool number_unsigned(json::number_unsigned_t v) { return put(v) != nullptr; }
  bool number_float(json::number_float_t v, const std::string& text) {
    // The lexer hands over an integer too large for 64 bits as a float.
    if (text.find_first_of(".eE") == std::string::npos) {
      return fail("integer " + Excerpt(text) +
                  " is outside the 64-bit range (it would lose digits)");
    }
    return put(v) != nullptr;
  }
  bool string(std::string& v) { return put(std::move(v)) != nullptr; }
  bool binary(json::binary_t&) { return fail("binary values are not JSON"); }

  bool start_object(size_t) { return open(json::object()); }
  bool key(std::string& k) {
    if (stack_.back()->contains(k)) return fail("duplicate key '" + Excerpt(k) + "' in an object");
    key_ = std::move(k);
    return true;
  }
  bool end_object() {
    stack_.pop_back();
    return true;
  }
  bool start_array(size_t) { return open(json::array()); }
  bool end_array() {
    stack_.pop_back();
    return true;
  }

  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& ex) {
    // "[json.exception.parse_error.101] parse error at line 1, ...": keep the useful part.
    std::string what = ex.what();
    size_t p = what.find("] ");
    if (p != std::string::npos) what = what.substr(p + 2);
    if (what.size() > 200) what = what.substr(0, 200) + "...";
    return fail(what);
  }

  json take() { return std::move(root_); }
  const std::string& error() const { return error_; }

 private:
  bool fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return false;
  }

  // Adds `v` to the innermost container (or makes it the root).
  json* put(json v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(v));
      return &top.back();
    }
    json& slot = top[key_];
    slot = std::move(v);
    return &slot;
  }

  bool open(json container) {
    if (stack_.size() >= max_depth_) {
      return fail("JSON is nested deeper than " + std::to_string(max_depth_) +
                  " levels of arrays and objects");
    }
    stack_.push_back(put(std::move(container)));
    return true;
  }

  const size_t max_depth_;
  json root_;
  std::vector<json*> stack_;
  std::string key_;
  std::string error_;
};

}  // namespace

Result<json> ParseJson(std::string_view text, size_t max_depth) {
  // nlohmann's lexer takes a NUL byte for the end of the input (C strings), so
  // `{...}\0anything` would parse as `{...}`. JSON has no raw NUL anywhere
  // (inside a string it must be escaped as \u0000).
  if (size_t nul = text.find('\0'); nul != std::string_view::npos) {
    return Status::InvalidArgument("a NUL byte at offset " + std::to_string(nul) +
                                   " is not JSON (inside a string, write \\u0000)");
  }
  StrictBuilder b(max_depth);
  bool ok = json::sax_parse(text.begin(), text.end(), &b, json::input_format_t::json,
                            /*strict=*/true);
  if (!ok) {
    return Status::InvalidArgument(b.error().empty() ? "invalid JSON" : b.error());
  }
  return b.take();
}

}  // namespace rpoint
