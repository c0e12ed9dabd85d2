// Request-target parsing for the control API: path segments and query
// parameters, percent-decoded. A segment is decoded after splitting, so an
// encoded "/" (%2F) stays inside its segment (and then fails name validation)
// instead of creating a new one.
//
// Thread-safety: pure functions.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace rpoint {

struct ParsedTarget {
  std::string path;                   // raw path, as sent
  std::vector<std::string> segments;  // decoded; "/" -> {}, "/a/b" -> {"a","b"}, "/a/" -> {"a",""}
  std::vector<std::pair<std::string, std::string>> query;  // decoded, in order

  // The value of query parameter `name`, or nullptr.
  const std::string* query_param(const std::string& name) const;
};

// InvalidArgument for a target that is not origin-form ("/..."), has bad
// percent-encoding, or repeats a query parameter.
Result<ParsedTarget> ParseTarget(std::string_view target);

// "%41b+c" -> "Ab c" when plus_is_space (query strings), "Ab+c" otherwise.
Result<std::string> PercentDecode(std::string_view s, bool plus_is_space);

}  // namespace rpoint
