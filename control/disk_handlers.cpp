#include "control/disk_handlers.h"

#include <limits.h>
#include <stdlib.h>

#include <algorithm>
#include <optional>

namespace rpoint {

namespace {

using nlohmann::json;

constexpr const char* kDiskType = "rpoint/disks";

// Properties a client may send, and those it may only read (sending one is a
// 400 that says so, rather than silently ignoring it).
const std::vector<std::string> kPutProperties = {"sizeBytes", "path", "kind"};
const std::vector<std::string> kPatchProperties = {"sizeBytes"};
const std::vector<std::string> kReadOnlyProperties = {
    "creationData", "deviceType",      "diskState", "attachedClients",
    "timeCreated",  "provisioningState", "export",  "error"};

bool Contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// 400 naming every property that is unknown, read-only or not settable here.
Status CheckProperties(const json& props, const std::vector<std::string>& settable,
                       const char* method) {
  std::vector<std::string> unknown, readonly, fixed;
  for (const auto& [key, value] : props.items()) {
    if (Contains(settable, key)) continue;
    if (Contains(kReadOnlyProperties, key)) {
      readonly.push_back(key);
    } else if (Contains(kPutProperties, key)) {
      fixed.push_back(key);
    } else {
      unknown.push_back(key);
    }
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& k : v) s += (s.empty() ? "'" : ", '") + k + "'";
    return s;
  };
  if (!unknown.empty()) {
    return Status::InvalidArgument("unknown propert" + std::string(unknown.size() > 1 ? "ies " : "y ") +
                                   join(unknown) + " in properties");
  }
  if (!readonly.empty()) {
    return Status::InvalidArgument("read-only propert" +
                                   std::string(readonly.size() > 1 ? "ies " : "y ") +
                                   join(readonly) + " cannot be set");
  }
  if (!fixed.empty()) {
    return Status::InvalidArgument(join(fixed) + " cannot be changed with " + method +
                                   "; only 'sizeBytes' can");
  }
  return Status::Ok();
}

// Checks the envelope {"properties": {...}} (plus optional matching name/id/type,
// so a GET result's identity can be sent back) and returns the properties.
Result<json> Properties(const json& body, const std::string& name) {
  std::vector<std::string> unknown;
  for (const auto& [key, value] : body.items()) {
    if (key == "properties") continue;
    if (key == "name") {
      if (!value.is_string() || value.get<std::string>() != name) {
        return Status::InvalidArgument("'name' in the body must match the URL ('" + name + "')");
      }
    } else if (key == "id") {
      if (!value.is_string() || value.get<std::string>() != "/disks/" + name) {
        return Status::InvalidArgument("'id' in the body must be '/disks/" + name + "'");
      }
    } else if (key == "type") {
      if (!value.is_string() || value.get<std::string>() != kDiskType) {
        return Status::InvalidArgument(std::string("'type' in the body must be '") + kDiskType + "'");
      }
    } else {
      unknown.push_back(key);
    }
  }
  if (!unknown.empty()) {
    std::string s;
    for (const auto& k : unknown) s += (s.empty() ? "'" : ", '") + k + "'";
    return Status::InvalidArgument("unknown field(s) " + s + " in the request body");
  }
  auto it = body.find("properties");
  if (it == body.end()) return Status::InvalidArgument("'properties' is required");
  if (!it->is_object()) return Status::InvalidArgument("'properties' must be an object");
  return *it;
}

Result<uint64_t> SizeField(const json& props) {
  const json& v = props.at("sizeBytes");
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) {
    return Status::InvalidArgument("properties.sizeBytes must be positive, got " + v.dump());
  }
  return Status::InvalidArgument("properties.sizeBytes must be an integer number of bytes, got " +
                                 v.dump());
}

Result<std::string> StringField(const json& props, const char* key) {
  const json& v = props.at(key);
  if (!v.is_string()) {
    return Status::InvalidArgument(std::string("properties.") + key + " must be a string, got " +
                                   v.dump());
  }
  return v.get<std::string>();
}

std::string Canonical(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : path;
}

// For a PUT on an existing disk: empty when the request asks for exactly what
// exists (the PUT is a repeat, answered 200), otherwise why it conflicts.
std::string Difference(const DiskRecord& d, const std::optional<uint64_t>& size,
                       const std::optional<std::string>& path, const std::string& kind) {
  std::string why = "disk '" + d.name + "' already exists";
  if (size && d.adopted) return why + " (adopted from " + d.path + ", not created with a size)";
  if (path && !d.adopted) return why + " (created with a size, not adopted)";
  if (size && *size != d.size_bytes) {
    return why + " with sizeBytes " + std::to_string(d.size_bytes) +
           (*size > d.size_bytes ? " (use PATCH to grow it)" : "");
  }
  if (path && Canonical(*path) != d.path) return why + " with path " + d.path;
  if (kind != d.kind) return why + " with kind '" + d.kind + "'";
  return "";
}

HttpResponse FromStatus(const Status& s) { return ErrorResponse(s); }

HttpResponse PutDisk(DiskService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  Status s = DiskService::ValidateName(name);
  if (!s.ok()) return FromStatus(s);
  json body;
  HttpResponse err;
  if (!ParseJsonObjectBody(ctx.request, &body, &err)) return err;
  auto props = Properties(body, name);
  if (!props.ok()) return FromStatus(props.status());
  s = CheckProperties(props.value(), kPutProperties, "PUT");
  if (!s.ok()) return FromStatus(s);

  std::optional<uint64_t> size;
  std::optional<std::string> path;
  std::string kind = "managed";
  if (props->contains("sizeBytes")) {
    auto v = SizeField(props.value());
    if (!v.ok()) return FromStatus(v.status());
    size = v.value();
  }
  if (props->contains("path")) {
    auto v = StringField(props.value(), "path");
    if (!v.ok()) return FromStatus(v.status());
    path = v.value();
  }
  if (props->contains("kind")) {
    auto v = StringField(props.value(), "kind");
    if (!v.ok()) return FromStatus(v.status());
    kind = v.value();
  }
  if (size.has_value() == path.has_value()) {
    return FromStatus(Status::InvalidArgument(
        "give exactly one of properties.sizeBytes (create a new disk) or properties.path "
        "(adopt an existing file or block device)"));
  }

  // An identical repeat of an earlier PUT succeeds with 200 (idempotent, as in
  // Azure); anything else on an existing name is a 409.
  auto existing_answer = [&](const DiskRecord& d) {
    std::string diff = Difference(d, size, path, kind);
    if (!diff.empty()) return ErrorResponse(409, "AlreadyExists", diff);
    return JsonResponse(200, DiskToJson(d));
  };
  if (auto d = svc.get(name); d.ok()) return existing_answer(d.value());

  auto created = size ? svc.create(name, *size, kind) : svc.adopt(name, *path, kind);
  if (created.ok()) return JsonResponse(201, DiskToJson(created.value()));
  if (created.status().code() == Code::kAlreadyExists) {
    // Lost a race with a concurrent PUT of the same name.
    if (auto d = svc.get(name); d.ok()) return existing_answer(d.value());
  }
  return FromStatus(created.status());
}

HttpResponse PatchDisk(DiskService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  Status s = DiskService::ValidateName(name);
  if (!s.ok()) return FromStatus(s);
  json body;
  HttpResponse err;
  if (!ParseJsonObjectBody(ctx.request, &body, &err)) return err;
  auto props = Properties(body, name);
  if (!props.ok()) return FromStatus(props.status());
  s = CheckProperties(props.value(), kPatchProperties, "PATCH");
  if (!s.ok()) return FromStatus(s);
  if (!props->contains("sizeBytes")) {
    auto d = svc.get(name);  // nothing to change
    if (!d.ok()) return FromStatus(d.status());
    return JsonResponse(200, DiskToJson(d.value()));
  }
  auto size = SizeField(props.value());
  if (!size.ok()) return FromStatus(size.status());
  auto d = svc.resize(name, size.value());
  if (!d.ok()) return FromStatus(d.status());
  return JsonResponse(200, DiskToJson(d.value()));
}

HttpResponse GetDisk(DiskService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  Status s = DiskService::ValidateName(name);
  if (!s.ok()) return FromStatus(s);
  auto d = svc.get(name);
  if (!d.ok()) return FromStatus(d.status());
  return JsonResponse(200, DiskToJson(d.value()));
}

HttpResponse ListDisks(DiskService& svc, const RequestContext&) {
  nlohmann::ordered_json value = nlohmann::ordered_json::array();
  for (const DiskRecord& d : svc.list()) value.push_back(DiskToJson(d));
  return JsonResponse(200, nlohmann::ordered_json{{"value", std::move(value)}});
}

HttpResponse DeleteDisk(DiskService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  Status s = DiskService::ValidateName(name);
  if (!s.ok()) return FromStatus(s);
  bool force = false;
  if (const std::string* f = ctx.target.query_param("force")) {
    if (*f == "true") {
      force = true;
    } else if (*f != "false") {
      return ErrorResponse(400, "InvalidQueryParameter",
                           "query parameter 'force' must be true or false, got '" + *f + "'");
    }
  }
  s = svc.remove(name, force);
  if (!s.ok()) return FromStatus(s);
  return EmptyResponse(204);
}

}  // namespace

nlohmann::ordered_json DiskToJson(const DiskRecord& d) {
  nlohmann::ordered_json props = {
      {"sizeBytes", d.size_bytes},
      {"path", d.path},
      {"kind", d.kind},
      {"deviceType", d.block_device ? "BlockDevice" : "File"},
      {"creationData", {{"createOption", d.adopted ? "Attach" : "Empty"}}},
      {"diskState", !d.error.empty()          ? "Unavailable"
                    : d.attached_clients > 0 ? "Attached"
                                             : "Unattached"},
      {"attachedClients", d.attached_clients},
      {"timeCreated", d.time_created},
      {"provisioningState", "Succeeded"},
      {"export", {{"nbd", {{"name", d.name}}}}},
  };
  if (!d.error.empty()) {
    props["error"] = {{"code", "BackingStoreUnavailable"}, {"message", d.error}};
  }
  return nlohmann::ordered_json{{"id", "/disks/" + d.name},
                                {"name", d.name},
                                {"type", kDiskType},
                                {"properties", std::move(props)}};
}

void AddDiskRoutes(Router& router, DiskService& disks) {
  DiskService* svc = &disks;
  router.add("GET", "/disks", [svc](const RequestContext& c) { return ListDisks(*svc, c); });
  router.add("GET", "/disks/{name}", [svc](const RequestContext& c) { return GetDisk(*svc, c); });
  router.add("PUT", "/disks/{name}", [svc](const RequestContext& c) { return PutDisk(*svc, c); });
  router.add("PATCH", "/disks/{name}",
             [svc](const RequestContext& c) { return PatchDisk(*svc, c); });
  router.add(
      "DELETE", "/disks/{name}", [svc](const RequestContext& c) { return DeleteDisk(*svc, c); },
      {"force"});
}

}  // namespace rpoint
