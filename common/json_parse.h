// ParseJson: the one strict JSON parser for text from outside the process
// (control API request bodies) and for JSON the daemon stored itself (SQLite
// columns), so neither can be made to recurse without bound.
//
// Refuses, with an InvalidArgument whose message says why:
//   - nesting deeper than `max_depth` arrays/objects (kJsonMaxDepth = 64): a
//     deeply nested document would otherwise overflow the stack wherever it is
//     later copied, compared or printed (nlohmann recurses there);
//   - a key repeated within one object (which of the two would win is not
//     something a client should have to guess);
//   - numbers that do not fit: 1e400 (not a finite double), and integers
//     outside the 64-bit range (nlohmann would silently turn them into doubles
//     and lose digits);
//   - syntax errors, invalid UTF-8, trailing garbage.
// Error messages are bounded in length (they quote at most a short excerpt).
//
// Thread-safety: a pure function.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string_view>

#include "common/status.h"

namespace rpoint {

inline constexpr size_t kJsonMaxDepth = 64;

Result<nlohmann::json> ParseJson(std::string_view text, size_t max_depth = kJsonMaxDepth);

}  // namespace rpoint
