#include "control/disk_handlers.h"

#include <limits.h>
#include <stdlib.h>

#include <optional>

#include "control/handler_common.h"
#include "restore/restore_service.h"

namespace rpoint {

namespace {

using nlohmann::json;

constexpr const char* kDiskType = "rpoint/disks";
constexpr const char* kRestoreSourcePrefix = "/restorePointCollections/";

// Properties a client may send, and those it may only read (sending one is a
// 400 that says so, rather than silently ignoring it).
const std::vector<std::string> kPutProperties = {
    "sizeBytes", "path", "kind", "trackingGranularityBytes", "creationData", "export"};
const std::vector<std::string> kPatchProperties = {"sizeBytes"};
const std::vector<std::string> kReadOnlyProperties = {
    "deviceType", "diskState", "attachedClients", "timeCreated", "provisioningState", "error"};

ResourceRules DiskRules(const std::string& name, const std::string& method) {
  ResourceRules r;
  r.id = "/disks/" + name;
  r.name = name;
  r.type = kDiskType;
  r.method = method;
  r.settable = method == "PUT" ? kPutProperties : kPatchProperties;
  r.create_only = kPutProperties;
  r.read_only = kReadOnlyProperties;
  return r;
}

std::string Canonical(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : path;
}

// What a PUT asks for.
struct DiskRequest {
  std::optional<uint64_t> size;
  std::optional<std::string> path;
  std::string kind = "managed";
  std::optional<uint32_t> granularity;
  std::string source;  // creationData.sourceResourceId: a restore
  std::string export_mode = "nbd";
};

// properties.export: "nbd" | "ublk", or a GET's object sent back
// ({"nbd": {...}} or {"ublk": {...}, "nbd": {...}}: ublk when it names ublk).
Result<std::string> ReadExport(const json& v) {
  if (v.is_string()) {
    std::string m = v.get<std::string>();
    if (Status s = DiskService::ValidateExport(m); !s.ok()) {
      return Status::InvalidArgument("properties.export must be \"nbd\" or \"ublk\", got '" + m +
                                     "'");
    }
    return m;
  }
  if (v.is_object()) return std::string(v.contains("ublk") ? "ublk" : "nbd");
  return Status::InvalidArgument("properties.export must be \"nbd\" or \"ublk\"");
}

// properties.creationData: {"createOption", "sourceResourceId"}. "Restore"
// needs a source; "Empty"/"Attach" are accepted so a GET's body can be sent back.
Status ReadCreationData(const json& cd, const DiskRequest& req, std::string* source) {
  if (Status s = CheckFields(cd, {"createOption", "sourceResourceId"}, "properties.creationData");
      !s.ok()) {
    return s;
  }
  std::string option;
  if (cd.contains("createOption")) {
    auto v = StringField(cd["createOption"], "properties.creationData.createOption");
    if (!v.ok()) return v.status();
    option = v.value();
  }
  if (cd.contains("sourceResourceId")) {
    auto v = StringField(cd["sourceResourceId"], "properties.creationData.sourceResourceId");
    if (!v.ok()) return v.status();
    *source = v.value();
    if (source->rfind(kRestoreSourcePrefix, 0) != 0) {
      return Status::InvalidArgument(
          "properties.creationData.sourceResourceId must be a disk restore point, "
          "'/restorePointCollections/C/restorePoints/RP/diskRestorePoints/DISK', got '" +
          *source + "'");
    }
    if (!option.empty() && option != "Restore") {
      return Status::InvalidArgument(
          "properties.creationData.createOption must be 'Restore' with a sourceResourceId, got '" +
          option + "'");
    }
    return Status::Ok();
  }
  if (option == "Restore") {
    return Status::InvalidArgument(
        "properties.creationData.sourceResourceId is required with createOption 'Restore'");
  }
  if (option == "Empty" && !req.size) {
    return Status::InvalidArgument("createOption 'Empty' needs properties.sizeBytes");
  }
  if (option == "Attach" && !req.path) {
    return Status::InvalidArgument("createOption 'Attach' needs properties.path");
  }
  if (!option.empty() && option != "Empty" && option != "Attach") {
    return Status::InvalidArgument(
        "properties.creationData.createOption must be 'Empty', 'Attach' or 'Restore', got '" +
        option + "'");
  }
  return Status::Ok();
}

Result<DiskRequest> ReadDiskRequest(const json& props) {
  DiskRequest req;
  if (props.contains("sizeBytes")) {
    auto v = UnsignedField(props["sizeBytes"], "properties.sizeBytes");
    if (!v.ok()) return v.status();
    req.size = v.value();
  }
  if (props.contains("path")) {
    auto v = StringField(props["path"], "properties.path");
    if (!v.ok()) return v.status();
    req.path = v.value();
  }
  if (props.contains("kind")) {
    auto v = StringField(props["kind"], "properties.kind");
    if (!v.ok()) return v.status();
    req.kind = v.value();
  }
  if (props.contains("trackingGranularityBytes")) {
    auto v =
        UnsignedField(props["trackingGranularityBytes"], "properties.trackingGranularityBytes");
    if (!v.ok()) return v.status();
    if (Status s = DiskService::ValidateTrackingGranularity(v.value()); !s.ok()) return s;
    req.granularity = static_cast<uint32_t>(v.value());
  }
  if (props.contains("export")) {
    auto v = ReadExport(props["export"]);
    if (!v.ok()) return v.status();
    req.export_mode = v.value();
  }
  if (props.contains("creationData")) {
    if (Status s = ReadCreationData(props["creationData"], req, &req.source); !s.ok()) return s;
  }
  if (!req.source.empty()) {
    // A restored disk takes its size and granularity from the source.
    if (req.size || req.path || req.granularity) {
      return Status::InvalidArgument(
          "a disk restored from creationData.sourceResourceId takes its size and tracking "
          "granularity from the restore point: leave out sizeBytes, path and "
          "trackingGranularityBytes");
    }
    if (req.kind != "managed") {
      return Status::InvalidArgument("restored disks are managed disks; kind '" + req.kind +
                                     "' cannot be restored into");
    }
    return req;
  }
  if (req.size.has_value() == req.path.has_value()) {
    return Status::InvalidArgument(
        "give exactly one of properties.sizeBytes (create a new disk), properties.path "
        "(adopt an existing file or block device) or properties.creationData.sourceResourceId "
        "(restore from a disk restore point)");
  }
  return req;
}

// For a PUT on an existing disk: empty when the request asks for exactly what
// exists (the PUT is a repeat, answered 200), otherwise why it conflicts.
std::string Difference(const DiskRecord& d, const DiskRequest& req) {
  std::string why = "disk '" + d.name + "' already exists";
  if (req.export_mode != d.export_mode) return why + " with export '" + d.export_mode + "'";
  if (!req.source.empty() || !d.source_resource_id.empty()) {
    if (req.source == d.source_resource_id) return "";
    return d.source_resource_id.empty() ? why + " (not restored from a restore point)"
                                        : why + " (restored from " + d.source_resource_id + ")";
  }
  if (req.size && d.adopted) return why + " (adopted from " + d.path + ", not created with a size)";
  if (req.path && !d.adopted) return why + " (created with a size, not adopted)";
  if (req.size && *req.size != d.size_bytes) {
    return why + " with sizeBytes " + std::to_string(d.size_bytes) +
           (*req.size > d.size_bytes ? " (use PATCH to grow it)" : "");
  }
  if (req.path && Canonical(*req.path) != d.path) return why + " with path " + d.path;
  if (req.kind != d.kind) return why + " with kind '" + d.kind + "'";
  if (req.granularity && *req.granularity != d.tracking_granularity) {
    return why + " with trackingGranularityBytes " + std::to_string(d.tracking_granularity);
  }
  return "";
}

HttpResponse PutDisk(DiskService& svc, RestoreService& restore, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  ResourceBody body;
  HttpResponse err;
  if (!ReadResourceBody(ctx, DiskRules(name, "PUT"), false, &body, &err)) return err;
  auto req = ReadDiskRequest(body.properties);
  if (!req.ok()) return ErrorResponse(req.status());

  // An identical repeat of an earlier PUT succeeds with 200 (idempotent, as in
  // Azure); anything else on an existing name is a 409.
  auto existing_answer = [&](const DiskRecord& d) {
    std::string diff = Difference(d, req.value());
    if (!diff.empty()) return ErrorResponse(409, "AlreadyExists", diff);
    return JsonResponse(200, DiskToJson(d));
  };
  if (auto d = svc.get(name); d.ok()) return existing_answer(d.value());

  if (req->export_mode != "nbd") {
    // Before anything is made: a host without the driver gets a clear 503.
    Status s = svc.export_available(req->export_mode);
    if (!s.ok()) {
      if (s.code() == Code::kInvalidArgument) return ErrorResponse(s);
      return ErrorResponse(503, "UblkUnavailable", s.message());
    }
  }

  if (!req->source.empty()) {
    auto op = restore.start_restore_disk(name, req->source);
    if (op.ok() && req->export_mode != "nbd") {
      // Recorded now; served as /dev/ublkbN once the restore has filled it.
      auto set = svc.set_export(name, req->export_mode);
      if (!set.ok() && set.status().code() != Code::kNotFound) return ErrorResponse(set.status());
    }
    if (!op.ok()) {
      if (op.status().code() == Code::kAlreadyExists) {
        if (auto d = svc.get(name); d.ok()) return existing_answer(d.value());
      }
      return ErrorResponse(op.status());
    }
    auto d = svc.get(name);
    if (!d.ok()) {
      // Already failed and removed: the operation says why.
      nlohmann::ordered_json gone =
          ResourceJson("/disks/" + name, name, kDiskType, {{"provisioningState", "Failed"}});
      return OperationStarted(201, gone, op.value());
    }
    return OperationStarted(201, DiskToJson(d.value()), op.value());
  }

  uint32_t granularity = req->granularity.value_or(DiskService::kDefaultTrackingGranularity);
  auto created = req->size
                     ? svc.create(name, *req->size, req->kind, granularity, req->export_mode)
                     : svc.adopt(name, *req->path, req->kind, granularity, req->export_mode);
  if (created.ok()) return JsonResponse(201, DiskToJson(created.value()));
  if (created.status().code() == Code::kAlreadyExists) {
    // Lost a race with a concurrent PUT of the same name.
    if (auto d = svc.get(name); d.ok()) return existing_answer(d.value());
  }
  return ErrorResponse(created.status());
}

HttpResponse PatchDisk(DiskService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  ResourceBody body;
  HttpResponse err;
  if (!ReadResourceBody(ctx, DiskRules(name, "PATCH"), false, &body, &err)) return err;
  if (!body.properties.contains("sizeBytes")) {
    auto d = svc.get(name);  // nothing to change
    if (!d.ok()) return ErrorResponse(d.status());
    return JsonResponse(200, DiskToJson(d.value()));
  }
  auto size = UnsignedField(body.properties["sizeBytes"], "properties.sizeBytes");
  if (!size.ok()) return ErrorResponse(size.status());
  auto d = svc.resize(name, size.value());
  if (!d.ok()) return ErrorResponse(d.status());
  return JsonResponse(200, DiskToJson(d.value()));
}

HttpResponse GetDisk(DiskService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  Status s = DiskService::ValidateName(name);
  if (!s.ok()) return ErrorResponse(s);
  auto d = svc.get(name);
  if (!d.ok()) return ErrorResponse(d.status());
  return JsonResponse(200, DiskToJson(d.value()));
}

HttpResponse ListDisks(DiskService& svc, const RequestContext&) {
  nlohmann::ordered_json value = nlohmann::ordered_json::array();
  for (const DiskRecord& d : svc.list()) value.push_back(DiskToJson(d));
  return ListResponse(std::move(value));
}

HttpResponse DeleteDisk(DiskService& svc, RestoreService& restore, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  Status s = DiskService::ValidateName(name);
  if (!s.ok()) return ErrorResponse(s);
  bool force = false;
  if (const std::string* f = ctx.target.query_param("force")) {
    if (*f == "true") {
      force = true;
    } else if (*f != "false") {
      return ErrorResponse(400, "InvalidQueryParameter",
                           "query parameter 'force' must be true or false, got '" + *f + "'");
    }
  }
  // A VM's restore points need all of its disks; force does not override this
  // (it is about NBD clients, not about the VM's definition).
  if (auto vm = restore.vm_of_disk(name)) {
    return ErrorResponse(409, "Conflict",
                         "disk '" + name + "' is in VM '" + *vm +
                             "'; remove it from the VM (PUT /vms/" + *vm +
                             " without it) or delete the VM first");
  }
  s = svc.remove(name, force);
  if (!s.ok()) return ErrorResponse(s);
  return EmptyResponse(204);
}

}  // namespace

nlohmann::ordered_json DiskToJson(const DiskRecord& d) {
  nlohmann::ordered_json creation;
  if (!d.source_resource_id.empty()) {
    creation = {{"createOption", "Restore"}, {"sourceResourceId", d.source_resource_id}};
  } else {
    creation = {{"createOption", d.adopted ? "Attach" : "Empty"}};
  }
  bool serving = d.provisioning_state == "Succeeded" && d.error.empty();
  nlohmann::ordered_json props = {
      {"sizeBytes", d.size_bytes},
      {"path", d.path},
      {"kind", d.kind},
      {"trackingGranularityBytes", d.tracking_granularity},
      {"deviceType", d.block_device ? "BlockDevice" : "File"},
      {"creationData", std::move(creation)},
      {"diskState", !d.error.empty()         ? "Unavailable"
                    : d.attached_clients > 0 ? "Attached"
                                             : "Unattached"},
      {"attachedClients", d.attached_clients},
      {"timeCreated", d.time_created},
      {"provisioningState", d.provisioning_state},
  };
  // A disk being restored is not served until its data is all there.
  if (serving) {
    nlohmann::ordered_json exp = {{"nbd", {{"name", d.name}}}};
    if (d.export_mode == "ublk") {
      // NBD reads it; ublk writes it (one writer at a time).
      exp["nbd"]["readOnly"] = true;
      nlohmann::ordered_json u = {{"state", d.ublk.state}};
      if (d.ublk.dev_id >= 0) {
        u["devId"] = d.ublk.dev_id;
        u["devicePath"] = d.ublk.device_path;
      }
      if (!d.ublk.copy_mode.empty()) u["copyMode"] = d.ublk.copy_mode;
      if (!d.ublk.error.empty()) u["error"] = d.ublk.error;
      exp["ublk"] = std::move(u);
    }
    props["export"] = std::move(exp);
  } else if (d.export_mode == "ublk") {
    props["export"] = {{"ublk", {{"state", "Unavailable"}}}};
  }
  if (!d.error.empty()) {
    props["error"] = {{"code", d.error_code}, {"message", d.error}};
  }
  return ResourceJson("/disks/" + d.name, d.name, kDiskType, std::move(props));
}

void AddDiskRoutes(Router& router, DiskService& disks, RestoreService& restore) {
  DiskService* svc = &disks;
  RestoreService* rs = &restore;
  router.add("GET", "/disks", [svc](const RequestContext& c) { return ListDisks(*svc, c); });
  router.add("GET", "/disks/{name}", [svc](const RequestContext& c) { return GetDisk(*svc, c); });
  router.add("PUT", "/disks/{name}",
             [svc, rs](const RequestContext& c) { return PutDisk(*svc, *rs, c); });
  router.add("PATCH", "/disks/{name}",
             [svc](const RequestContext& c) { return PatchDisk(*svc, c); });
  router.add("DELETE", "/disks/{name}",
             [svc, rs](const RequestContext& c) { return DeleteDisk(*svc, *rs, c); }, {"force"});
}

}  // namespace rpoint
