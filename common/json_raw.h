// Raw JSON values: a member of a document kept as the exact text it was given
// in, for values the daemon treats as opaque (a VM's configuration), which
// nlohmann::json would otherwise normalise (big integers and long fractions
// become doubles, key order is sorted, 1e400 does not parse at all).
//
// A raw value travels inside an ordinary nlohmann::json as a binary value
// tagged kRawJsonSubtype (RawJsonValue). Every place that writes such a
// document out (responses, SQLite rows, manifests) uses DumpJson, which splices
// the raw text in where nlohmann would print the binary. ParseJsonKeepingRaw
// reads a document back with the member at `path` kept raw.
//
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "common/json_parse.h"
#include "common/status.h"

namespace rpoint {

inline constexpr uint8_t kRawJsonSubtype = 0x52;  // 'R'

// `text` must be one valid JSON value (the caller validated it). Returns a
// binary value tagged kRawJsonSubtype holding `text`.
nlohmann::json RawJsonValue(std::string_view text);

// The text of a value from RawJsonValue (the binary's bytes, or a dump).
std::string RawJsonText(const nlohmann::json& value);

// Parses `text` strictly like ParseJson (same depth bound, duplicate keys,
// syntax and UTF-8 checks), except that inside the value of the member at
// `path` (object keys from the root, e.g. {"properties", "configuration"};
// empty: the whole document)
// any syntactically valid number is accepted whatever its range; that member
// becomes RawJsonValue(its exact text). Without such a member, ParseJson.
Result<nlohmann::json> ParseJsonKeepingRaw(std::string_view text,
                                           const std::vector<std::string_view>& path,
                                           size_t max_depth = kJsonMaxDepth);

// j.dump(indent, ' ', false, replace) with every kRawJsonSubtype binary
// printed as its raw text, verbatim.
std::string DumpJson(const nlohmann::ordered_json& j, int indent = -1);
std::string DumpJson(const nlohmann::json& j, int indent = -1);

}  // namespace rpoint
