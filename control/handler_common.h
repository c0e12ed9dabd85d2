// Pieces every resource handler shares: reading a request body as a resource
// envelope ({"properties": {...}} plus optional id/name/type that must match
// the URL), strict property checks (unknown or read-only names are a 400 that
// names them, never silently ignored), typed field readers, the JSON shape of a
// resource, and the headers of a long-running operation's answer.
//
// Thread-safety: free functions over values.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "control/http_types.h"
#include "control/router.h"

namespace rpoint {

// What a resource's body may hold.
struct ResourceRules {
  std::string id;    // the resource's id ("/disks/a"): a body "id" must equal it
  std::string name;  // its name: a body "name" must equal it
  std::string type;  // its type ("rpoint/disks"): a body "type" must equal it
  // Top-level fields besides id/name/type/properties (e.g. "location"); the
  // handler checks their values.
  std::vector<std::string> extra_fields;
  bool properties_required = true;  // false: a missing "properties" is {}
  // Properties this method may set; those settable only at creation (named
  // "cannot be changed with METHOD" when sent to another method); those only in
  // responses ("read-only ... cannot be set").
  std::vector<std::string> settable;
  std::vector<std::string> create_only;
  std::vector<std::string> read_only;
  std::string method = "PUT";
  // A property kept as the exact JSON text sent (common/json_raw.h), e.g.
  // "configuration"; empty: none.
  std::string raw_property;
};

// A parsed, checked resource body.
struct ResourceBody {
  nlohmann::json body;        // the whole object
  nlohmann::json properties;  // always an object
};

// Validates `name` with DiskService::ValidateName (every resource name follows
// the disk name rule), parses the body (see ParseJsonObjectBody; with
// `allow_empty`, an empty body is {}), checks the envelope and the properties.
// On failure returns false with *error set.
bool ReadResourceBody(const RequestContext& ctx, const ResourceRules& rules, bool allow_empty,
                      ResourceBody* out, HttpResponse* error);

// Parses an optional body of an action (POST .../verify): empty or a JSON
// object. On failure returns false with *error set.
bool ReadActionBody(const RequestContext& ctx, nlohmann::json* out, HttpResponse* error);

// InvalidArgument naming every key of `object` not in `allowed`; `where` says
// whose keys they are ("properties.creationData").
Status CheckFields(const nlohmann::json& object, const std::vector<std::string>& allowed,
                   const std::string& where);
// `where` names the field in messages, e.g. "properties.kind"; `unit` is what
// an integer field counts ("bytes", "seconds").
Result<std::string> StringField(const nlohmann::json& value, const std::string& where);
Result<uint64_t> UnsignedField(const nlohmann::json& value, const std::string& where,
                               const char* unit = "bytes");
// A reference to a resource: {"id": "/disks/a"} (an extra "name" must match)
// or the plain string "/disks/a". Returns the name after `prefix` ("/disks/").
Result<std::string> ReferenceField(const nlohmann::json& value, const std::string& prefix,
                                   const std::string& where);

// 'a', 'b', 'c'
std::string JoinQuoted(const std::vector<std::string>& items);

// {"id", "name", "type", "properties"} in that order.
nlohmann::ordered_json ResourceJson(const std::string& id, const std::string& name,
                                    const std::string& type, nlohmann::ordered_json properties);
// {"value": [...]}
HttpResponse ListResponse(nlohmann::ordered_json items);

// The answer that starts a long-running operation (201 for a created resource,
// 202 for an action): Azure-AsyncOperation and Location point at
// /operations/{id}, Retry-After says when to poll.
HttpResponse OperationStarted(int status, const nlohmann::ordered_json& body,
                              const std::string& operation_id);
std::string OperationPath(const std::string& operation_id);

// ?$expand=: *expand is whether it names `allowed` (absent: false); any other
// value is 400 InvalidQueryParameter (returns false with *error set).
bool ReadExpand(const RequestContext& ctx, const std::string& allowed, bool* expand,
                HttpResponse* error);

}  // namespace rpoint
