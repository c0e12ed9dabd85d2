#include "control/handler_common.h"

#include <algorithm>
#include <string>
#include <utility>

#include "disks/disk_service.h"

namespace rpoint {

namespace {

using nlohmann::json;

bool Contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

std::string Plural(size_t n, const char* one, const char* many) {
  return n > 1 ? many : one;
}

// The envelope: id/name/type must match when present, `extra_fields` are
// allowed, anything else is named in a 400.
Status CheckEnvelope(const json& body, const ResourceRules& rules) {
  std::vector<std::string> unknown;
  for (const auto& [key, value] : body.items()) {
    if (key == "properties" || Contains(rules.extra_fields, key)) continue;
    if (key == "name") {
      if (!value.is_string() || value.get<std::string>() != rules.name) {
        return Status::InvalidArgument("'name' in the body must match the URL ('" + rules.name +
                                       "')");
      }
    } else if (key == "id") {
      if (!value.is_string() || value.get<std::string>() != rules.id) {
        return Status::InvalidArgument("'id' in the body must be '" + rules.id + "'");
      }
    } else if (key == "type") {
      if (!value.is_string() || value.get<std::string>() != rules.type) {
        return Status::InvalidArgument("'type' in the body must be '" + rules.type + "'");
      }
    } else {
      unknown.push_back(key);
    }
  }
  if (!unknown.empty()) {
    return Status::InvalidArgument("unknown field" + Plural(unknown.size(), " ", "s ") +
                                   JoinQuoted(unknown) + " in the request body");
  }
  return Status::Ok();
}

// 400 naming every property that is unknown, read-only or not settable here.
Status CheckProperties(const json& props, const ResourceRules& rules) {
  std::vector<std::string> unknown, readonly, fixed;
  for (const auto& [key, value] : props.items()) {
    if (Contains(rules.settable, key)) continue;
    if (Contains(rules.read_only, key)) {
      readonly.push_back(key);
    } else if (Contains(rules.create_only, key)) {
      fixed.push_back(key);
    } else {
      unknown.push_back(key);
    }
  }
  if (!unknown.empty()) {
    return Status::InvalidArgument("unknown propert" + Plural(unknown.size(), "y ", "ies ") +
                                   JoinQuoted(unknown) + " in properties");
  }
  if (!readonly.empty()) {
    return Status::InvalidArgument("read-only propert" + Plural(readonly.size(), "y ", "ies ") +
                                   JoinQuoted(readonly) + " cannot be set");
  }
  if (!fixed.empty()) {
    std::string can =
        rules.settable.empty() ? "nothing can" : "only " + JoinQuoted(rules.settable) + " can";
    return Status::InvalidArgument(JoinQuoted(fixed) + " cannot be changed with " + rules.method +
                                   "; " + can);
  }
  return Status::Ok();
}

// "VM name", "collection name"...: what a bad name in an error message is.
std::string NameKind(const std::string& type) {
  static const std::pair<const char*, const char*> kKinds[] = {
      {"/vms", "VM name"},
      {"/restorePointCollections", "collection name"},
      {"/diskRestorePoints", "disk restore point name"},
      {"/restorePoints", "restore point name"},
      {"/disks", "disk name"}};
  for (const auto& [suffix, kind] : kKinds) {
    std::string sfx = suffix;
    if (type.size() >= sfx.size() && type.compare(type.size() - sfx.size(), sfx.size(), sfx) == 0) {
      return kind;
    }
  }
  return "name";
}

}  // namespace

bool ReadResourceBody(const RequestContext& ctx, const ResourceRules& rules, bool allow_empty,
                      ResourceBody* out, HttpResponse* error) {
  if (Status s = DiskService::ValidateName(rules.name, NameKind(rules.type)); !s.ok()) {
    *error = ErrorResponse(s);
    return false;
  }
  if (allow_empty && ctx.request.body.find_first_not_of(" \t\r\n") == std::string::npos) {
    out->body = json::object();
  } else if (!ParseJsonObjectBody(
                 ctx.request, &out->body, error,
                 rules.raw_property.empty()
                     ? std::vector<std::string_view>{}
                     : std::vector<std::string_view>{"properties", rules.raw_property})) {
    return false;
  }
  Status s = CheckEnvelope(out->body, rules);
  if (s.ok()) {
    auto it = out->body.find("properties");
    if (it == out->body.end() || (it->is_null() && !rules.properties_required)) {
      if (rules.properties_required) s = Status::InvalidArgument("'properties' is required");
      out->properties = json::object();
    } else if (!it->is_object()) {
      s = Status::InvalidArgument("'properties' must be an object");
    } else {
      out->properties = *it;
    }
  }
  if (s.ok()) s = CheckProperties(out->properties, rules);
  if (!s.ok()) {
    *error = ErrorResponse(s);
    return false;
  }
  return true;
}

bool ReadActionBody(const RequestContext& ctx, json* out, HttpResponse* error) {
  if (ctx.request.body.find_first_not_of(" \t\r\n") == std::string::npos) {
    *out = json::object();
    return true;
  }
  return ParseJsonObjectBody(ctx.request, out, error);
}

Status CheckFields(const json& object, const std::vector<std::string>& allowed,
                   const std::string& where) {
  if (!object.is_object()) {
    return Status::InvalidArgument(where + " must be an object, got " + object.dump());
  }
  std::vector<std::string> unknown;
  for (const auto& [key, value] : object.items()) {
    if (!Contains(allowed, key)) unknown.push_back(key);
  }
  if (unknown.empty()) return Status::Ok();
  return Status::InvalidArgument("unknown field" + Plural(unknown.size(), " ", "s ") +
                                 JoinQuoted(unknown) + " in " + where +
                                 "; allowed: " + JoinQuoted(allowed));
}

Result<std::string> StringField(const json& value, const std::string& where) {
  if (!value.is_string()) {
    return Status::InvalidArgument(where + " must be a string, got " + value.dump());
  }
  return value.get<std::string>();
}

Result<uint64_t> UnsignedField(const json& value, const std::string& where, const char* unit) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer()) {
    return Status::InvalidArgument(where + " must be positive, got " + value.dump());
  }
  return Status::InvalidArgument(where + " must be an integer number of " + unit + ", got " +
                                 value.dump());
}

Result<std::string> ReferenceField(const json& value, const std::string& prefix,
                                   const std::string& where) {
  std::string id;
  if (value.is_string()) {
    id = value.get<std::string>();
  } else if (value.is_object()) {
    if (Status s = CheckFields(value, {"id", "name"}, where); !s.ok()) return s;
    auto it = value.find("id");
    if (it == value.end()) return Status::InvalidArgument(where + ".id is required");
    auto s = StringField(*it, where + ".id");
    if (!s.ok()) return s.status();
    id = s.value();
  } else {
    return Status::InvalidArgument(where + " must be {\"id\": \"" + prefix + "NAME\"}, got " +
                                   value.dump());
  }
  if (id.rfind(prefix, 0) != 0 || id.size() == prefix.size() ||
      id.find('/', prefix.size()) != std::string::npos) {
    return Status::InvalidArgument(where + ".id must look like '" + prefix + "NAME', got '" + id +
                                   "'");
  }
  std::string name = id.substr(prefix.size());
  if (value.is_object() && value.contains("name") &&
      (!value["name"].is_string() || value["name"].get<std::string>() != name)) {
    return Status::InvalidArgument(where + ".name must match its id ('" + name + "')");
  }
  return name;
}

std::string JoinQuoted(const std::vector<std::string>& items) {
  std::string s;
  for (const auto& k : items) s += (s.empty() ? "'" : ", '") + k + "'";
  return s;
}

nlohmann::ordered_json ResourceJson(const std::string& id, const std::string& name,
                                    const std::string& type, nlohmann::ordered_json properties) {
  return nlohmann::ordered_json{
      {"id", id}, {"name", name}, {"type", type}, {"properties", std::move(properties)}};
}

HttpResponse ListResponse(nlohmann::ordered_json items) {
  if (!items.is_array()) items = nlohmann::ordered_json::array();
  return JsonResponse(200, nlohmann::ordered_json{{"value", std::move(items)}});
}

std::string OperationPath(const std::string& operation_id) {
  return "/operations/" + operation_id;
}

HttpResponse OperationStarted(int status, const nlohmann::ordered_json& body,
                              const std::string& operation_id) {
  HttpResponse r = JsonResponse(status, body);
  r.headers.emplace_back("Azure-AsyncOperation", OperationPath(operation_id));
  r.headers.emplace_back("Location", OperationPath(operation_id));
  r.headers.emplace_back("Retry-After", "1");
  return r;
}

bool ReadExpand(const RequestContext& ctx, const std::string& allowed, bool* expand,
                HttpResponse* error) {
  *expand = false;
  const std::string* v = ctx.target.query_param("$expand");
  if (v == nullptr) return true;
  if (*v != allowed) {
    *error = ErrorResponse(400, "InvalidQueryParameter",
                           "query parameter '$expand' must be '" + allowed + "', got '" + *v + "'");
    return false;
  }
  *expand = true;
  return true;
}

}  // namespace rpoint
