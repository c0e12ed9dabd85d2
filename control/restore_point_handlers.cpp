#include "control/restore_point_handlers.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "disks/disk_service.h"
#include "control/handler_common.h"
#include "control/operation_handlers.h"

namespace rpoint {

namespace {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr const char* kCollectionType = "rpoint/restorePointCollections";
constexpr const char* kRestorePointType = "rpoint/restorePoints";
constexpr const char* kDiskRestorePointType = "rpoint/diskRestorePoints";
constexpr const char* kRegionType = "rpoint/regions";

std::string CollectionId(const std::string& c) {
  return "/restorePointCollections/" + c;
}
std::string RestorePointId(const std::string& c, const std::string& rp) {
  return CollectionId(c) + "/restorePoints/" + rp;
}
std::string DiskRestorePointId(const std::string& c, const std::string& rp, const std::string& d) {
  return RestorePointId(c, rp) + "/diskRestorePoints/" + d;
}

// Every {param} of the route, validated as a resource name (400 naming it).
bool ValidNames(const RequestContext& ctx, HttpResponse* err) {
  // Routes nest as collection / restore point / disk restore point.
  static const char* const kKinds[] = {"collection name", "restore point name",
                                       "disk restore point name"};
  for (size_t i = 0; i < ctx.params.size(); ++i) {
    const std::string& p = ctx.params[i];
    if (Status s = DiskService::ValidateName(p, i < 3 ? kKinds[i] : "name"); !s.ok()) {
      *err = ErrorResponse(s);
      return false;
    }
  }
  return true;
}

// ---- regions ----

HttpResponse ListRegions(RestoreService& svc, const RequestContext&) {
  ojson value = ojson::array();
  for (const RegionSpec& r : svc.regions()) {
    ojson props = {{"path", r.path}, {"default", r.is_default}};
    if (!r.peer.empty()) {
      props["peer"] = r.peer;
      props["peerRegion"] = r.peer_region;
    }
    Status state = svc.region_status(r.name);
    props["state"] = state.ok() ? "Available" : "Unavailable";
    if (!state.ok()) props["error"] = {{"code", "RegionUnavailable"}, {"message", state.message()}};
    value.push_back(ResourceJson("/regions/" + r.name, r.name, kRegionType, std::move(props)));
  }
  return ListResponse(std::move(value));
}

// POST /regions/{region}/repair: re-index the region from its files and
// import the restore points its manifests hold. Synchronous; JSON result.
HttpResponse RepairRegion(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  json body;
  if (!ReadActionBody(ctx, &body, &err)) return err;
  if (!body.empty()) {
    return ErrorResponse(Status::InvalidArgument("repair takes no request body fields"));
  }
  auto r = svc.repair_region(ctx.params[0]);
  if (!r.ok()) return ErrorResponse(r.status());
  return JsonResponse(200, ojson::parse(r.value().dump()));
}

// POST /regions/{region}/gc[?orphans=true]: a GC pass now; with orphans=true
// also deletes store points no restore point names and unusable pack files.
HttpResponse GcRegion(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  json body;
  if (!ReadActionBody(ctx, &body, &err)) return err;
  if (!body.empty())
    return ErrorResponse(Status::InvalidArgument("gc takes no request body fields"));
  bool orphans = false;
  if (const std::string* v = ctx.target.query_param("orphans")) {
    if (*v != "true" && *v != "false") {
      return ErrorResponse(400, "InvalidQueryParameter",
                           "query parameter 'orphans' must be 'true' or 'false', got '" + *v + "'");
    }
    orphans = *v == "true";
  }
  auto r = svc.gc_region(ctx.params[0], orphans);
  if (!r.ok()) return ErrorResponse(r.status());
  return JsonResponse(200, ojson::parse(r.value().dump()));
}

// ---- collections ----

HttpResponse PutCollection(RestoreService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  ResourceRules rules;
  rules.id = CollectionId(name);
  rules.name = name;
  rules.type = kCollectionType;
  rules.extra_fields = {"location"};
  rules.settable = {"source"};
  rules.read_only = {"restorePointCollectionId", "provisioningState", "timeCreated",
                     "restorePoints"};
  ResourceBody body;
  HttpResponse err;
  if (!ReadResourceBody(ctx, rules, false, &body, &err)) return err;

  std::string region;
  if (auto it = body.body.find("location"); it != body.body.end() && !it->is_null()) {
    auto v = StringField(*it, "location");
    if (!v.ok()) return ErrorResponse(v.status());
    region = v.value();
    std::vector<std::string> names;
    for (const RegionSpec& r : svc.regions()) names.push_back(r.name);
    if (std::find(names.begin(), names.end(), region) == names.end()) {
      return ErrorResponse(Status::InvalidArgument("unknown location '" + region +
                                                   "'; the regions are " + JoinQuoted(names)));
    }
  }
  auto src = body.properties.find("source");
  if (src == body.properties.end()) {
    return ErrorResponse(Status::InvalidArgument(
        "properties.source is required: the VM, e.g. {\"id\": \"/vms/web1\"}"));
  }
  if (src->is_object() && src->contains("location")) {
    // A GET's body sent back carries source.location: it must agree.
    const json& l = (*src)["location"];
    if (!l.is_string() || (!region.empty() && l.get<std::string>() != region)) {
      return ErrorResponse(
          Status::InvalidArgument("properties.source.location must be the collection's location"));
    }
    if (region.empty()) region = l.get<std::string>();
  }
  json source = *src;
  if (source.is_object()) source.erase("location");
  auto vm = ReferenceField(source, "/vms/", "properties.source");
  if (!vm.ok()) return ErrorResponse(vm.status());

  auto r = svc.put_collection(name, vm.value(), region);
  if (!r.ok()) return ErrorResponse(r.status());
  return JsonResponse(r->second ? 201 : 200, CollectionToJson(r->first));
}

HttpResponse GetCollection(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  bool expand = false;
  if (!ReadExpand(ctx, "restorePoints", &expand, &err)) return err;
  auto c = svc.get_collection(ctx.params[0]);
  if (!c.ok()) return ErrorResponse(c.status());
  ojson j = CollectionToJson(c.value());
  if (expand) {
    auto points = svc.list_restore_points(ctx.params[0]);
    if (!points.ok()) return ErrorResponse(points.status());
    ojson list = ojson::array();
    for (const auto& rp : points.value()) list.push_back(RestorePointToJson(rp, false));
    j["properties"]["restorePoints"] = std::move(list);
  }
  return JsonResponse(200, j);
}

HttpResponse ListCollections(RestoreService& svc, const RequestContext&) {
  ojson value = ojson::array();
  for (const CollectionRecord& c : svc.list_collections()) value.push_back(CollectionToJson(c));
  return ListResponse(std::move(value));
}

HttpResponse DeleteCollection(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  if (Status s = svc.delete_collection(ctx.params[0]); !s.ok()) return ErrorResponse(s);
  return EmptyResponse(204);
}

// ---- restore points ----

HttpResponse PutRestorePoint(RestoreService& svc, const RequestContext& ctx) {
  const std::string& collection = ctx.params[0];
  const std::string& name = ctx.params[1];
  HttpResponse err;
  if (Status s = DiskService::ValidateName(collection, "collection name"); !s.ok()) {
    return ErrorResponse(s);
  }
  ResourceRules rules;
  rules.id = RestorePointId(collection, name);
  rules.name = name;
  rules.type = kRestorePointType;
  rules.properties_required = false;  // {} or no body at all: every default
  rules.settable = {"excludeDisks", "consistencyMode", "sourceRestorePoint"};
  rules.read_only = {"timeCreated", "provisioningState", "sourceMetadata", "instanceView", "error"};
  ResourceBody body;
  if (!ReadResourceBody(ctx, rules, true, &body, &err)) return err;
  const json& props = body.properties;

  // A copy of a point of another collection (of the same VM, in another
  // region): its disks and mode are the source's.
  if (auto it = props.find("sourceRestorePoint"); it != props.end() && !it->is_null()) {
    for (const char* f : {"excludeDisks", "consistencyMode"}) {
      if (props.contains(f) && !props[f].is_null()) {
        return ErrorResponse(Status::InvalidArgument(
            std::string("properties.") + f +
            " cannot be set on a copy (properties.sourceRestorePoint): it is the source's"));
      }
    }
    const std::string where = "properties.sourceRestorePoint";
    json ref = *it;
    if (ref.is_object() && ref.contains("id") && ref["id"].is_string()) {
      // /restorePointCollections/{c}/restorePoints/{rp}
      std::string id = ref["id"].get<std::string>();
      const std::string head = "/restorePointCollections/";
      size_t mid = id.find("/restorePoints/", head.size());
      if (id.rfind(head, 0) != 0 || mid == std::string::npos) {
        return ErrorResponse(Status::InvalidArgument(
            where + ".id must look like '/restorePointCollections/C/restorePoints/RP', got '" + id +
            "'"));
      }
      std::string src_c = id.substr(head.size(), mid - head.size());
      auto src_rp = ReferenceField(json{{"id", id.substr(mid)}}, "/restorePoints/", where);
      if (!src_rp.ok()) return ErrorResponse(src_rp.status());
      if (Status v = DiskService::ValidateName(src_c, "collection name"); !v.ok()) {
        return ErrorResponse(v);
      }
      if (Status v = CheckFields(ref, {"id"}, where); !v.ok()) return ErrorResponse(v);
      auto started = svc.copy_restore_point(collection, name, src_c, src_rp.value());
      if (!started.ok()) return ErrorResponse(started.status());
      ojson j = RestorePointToJson(started->record, false);
      if (!started->created) return JsonResponse(200, j);
      return OperationStarted(201, j, started->operation_id);
    }
    return ErrorResponse(Status::InvalidArgument(
        where + " must be {\"id\": \"/restorePointCollections/C/restorePoints/RP\"}, got " +
        ref.dump()));
  }

  std::vector<std::string> exclude;
  if (auto it = props.find("excludeDisks"); it != props.end() && !it->is_null()) {
    if (!it->is_array()) {
      return ErrorResponse(Status::InvalidArgument(
          "properties.excludeDisks must be a list of {\"id\": \"/disks/NAME\"}, got " +
          it->dump()));
    }
    std::set<std::string> seen;
    for (size_t i = 0; i < it->size(); ++i) {
      auto d =
          ReferenceField((*it)[i], "/disks/", "properties.excludeDisks[" + std::to_string(i) + "]");
      if (!d.ok()) return ErrorResponse(d.status());
      if (seen.insert(d.value()).second) exclude.push_back(d.value());
    }
  }
  std::string mode = "CrashConsistent";
  if (auto it = props.find("consistencyMode"); it != props.end() && !it->is_null()) {
    auto v = StringField(*it, "properties.consistencyMode");
    if (!v.ok()) return ErrorResponse(v.status());
    mode = v.value();
    if (mode != "CrashConsistent" && mode != "FileSystemConsistent") {
      return ErrorResponse(Status::InvalidArgument(
          "properties.consistencyMode must be 'CrashConsistent' or 'FileSystemConsistent', got '" +
          mode + "'"));
    }
  }

  auto started = svc.create_restore_point(collection, name, exclude, mode);
  if (!started.ok()) return ErrorResponse(started.status());
  ojson j = RestorePointToJson(started->record, false);
  if (!started->created) return JsonResponse(200, j);
  return OperationStarted(201, j, started->operation_id);
}

HttpResponse GetRestorePoint(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  bool expand = false;
  if (!ReadExpand(ctx, "instanceView", &expand, &err)) return err;
  auto rp = svc.get_restore_point(ctx.params[0], ctx.params[1]);
  if (!rp.ok()) return ErrorResponse(rp.status());
  return JsonResponse(200, RestorePointToJson(rp.value(), expand));
}

HttpResponse ListRestorePoints(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  auto points = svc.list_restore_points(ctx.params[0]);
  if (!points.ok()) return ErrorResponse(points.status());
  ojson value = ojson::array();
  for (const auto& rp : points.value()) value.push_back(RestorePointToJson(rp, false));
  return ListResponse(std::move(value));
}

HttpResponse DeleteRestorePoint(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  if (Status s = svc.delete_restore_point(ctx.params[0], ctx.params[1]); !s.ok()) {
    return ErrorResponse(s);
  }
  return EmptyResponse(204);
}

// ---- disk restore points ----

HttpResponse ListDiskRestorePoints(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  auto rp = svc.get_restore_point(ctx.params[0], ctx.params[1]);
  if (!rp.ok()) return ErrorResponse(rp.status());
  ojson value = ojson::array();
  for (const auto& d : rp->disk_restore_points) value.push_back(DiskRestorePointToJson(*rp, d));
  return ListResponse(std::move(value));
}

HttpResponse GetDiskRestorePoint(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  auto rp = svc.get_restore_point(ctx.params[0], ctx.params[1]);
  if (!rp.ok()) return ErrorResponse(rp.status());
  for (const auto& d : rp->disk_restore_points) {
    if (d.disk == ctx.params[2]) return JsonResponse(200, DiskRestorePointToJson(*rp, d));
  }
  return ErrorResponse(Status::NotFound("restore point '" + ctx.params[0] + "/" + ctx.params[1] +
                                        "' has no disk restore point '" + ctx.params[2] + "'"));
}

// ---- actions ----

// The 202 of an action: the operation as it is now, with the polling headers.
HttpResponse ActionStarted(RestoreService& svc, const std::string& operation_id) {
  auto op = svc.get_operation(operation_id);
  ojson body = op.ok() ? OperationToJson(op.value())
                       : ojson{{"id", OperationPath(operation_id)},
                               {"name", operation_id},
                               {"status", "InProgress"}};
  return OperationStarted(202, body, operation_id);
}

HttpResponse Verify(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  json body;
  if (!ReadActionBody(ctx, &body, &err)) return err;
  if (!body.empty()) {
    return ErrorResponse(Status::InvalidArgument(
        "verify takes no request body fields (send no body or {}), got " + JoinQuoted([&] {
          std::vector<std::string> keys;
          for (const auto& [k, v] : body.items()) keys.push_back(k);
          return keys;
        }())));
  }
  auto op = svc.start_verify(ctx.params[0], ctx.params[1]);
  if (!op.ok()) return ErrorResponse(op.status());
  return ActionStarted(svc, op.value());
}

HttpResponse Restore(RestoreService& svc, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  json body;
  if (!ParseJsonObjectBody(ctx.request, &body, &err)) return err;
  if (Status s = CheckFields(body, {"vmName", "diskNames"}, "the request body"); !s.ok()) {
    return ErrorResponse(s);
  }
  if (!body.contains("vmName")) {
    return ErrorResponse(Status::InvalidArgument("'vmName' is required: the VM to create"));
  }
  auto vm = StringField(body["vmName"], "vmName");
  if (!vm.ok()) return ErrorResponse(vm.status());
  if (Status s = DiskService::ValidateName(vm.value(), "VM name"); !s.ok()) return ErrorResponse(s);
  std::map<std::string, std::string> names;
  if (auto it = body.find("diskNames"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) {
      return ErrorResponse(Status::InvalidArgument(
          "diskNames must map source disk names to new names, e.g. {\"a\": \"new-a\"}"));
    }
    for (const auto& [src, dst] : it->items()) {
      auto v = StringField(dst, "diskNames." + src);
      if (!v.ok()) return ErrorResponse(v.status());
      if (Status s = DiskService::ValidateName(v.value()); !s.ok()) return ErrorResponse(s);
      names[src] = v.value();
    }
  }
  auto op = svc.start_restore_vm(ctx.params[0], ctx.params[1], vm.value(), names);
  if (!op.ok()) return ErrorResponse(op.status());
  return ActionStarted(svc, op.value());
}

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

}  // namespace

ojson CollectionToJson(const CollectionRecord& c) {
  return ojson{{"id", CollectionId(c.name)},
               {"name", c.name},
               {"type", kCollectionType},
               {"location", c.region},
               {"properties",
                {{"source", {{"id", "/vms/" + c.source_vm}, {"location", c.region}}},
                 {"restorePointCollectionId", c.name},
                 {"provisioningState", c.provisioning_state},
                 {"timeCreated", c.time_created}}}};
}

ojson RestorePointToJson(const RestorePointRecord& rp, bool instance_view) {
  ojson exclude = ojson::array();
  for (const auto& d : rp.exclude_disks) exclude.push_back({{"id", "/disks/" + d}});

  // sourceMetadata: the VM as it was at the cut, in Azure's shape.
  const json& meta = rp.source_metadata.is_object() ? rp.source_metadata : json::object();
  std::string vm_name = meta.value("vmName", std::string());
  ojson disks = ojson::array();
  // The service keeps the disks either in Azure's place (storageProfile.disks)
  // or as a plain "disks" list: read whichever is there.
  const json* listed = nullptr;
  if (auto sp = meta.find("storageProfile"); sp != meta.end() && sp->is_object()) {
    if (auto it = sp->find("disks"); it != sp->end() && it->is_array()) listed = &*it;
  }
  if (auto it = meta.find("disks"); listed == nullptr && it != meta.end() && it->is_array()) {
    listed = &*it;
  }
  if (listed != nullptr) {
    for (const json& d : *listed) {
      std::string name = d.value("name", std::string());
      if (std::find(rp.exclude_disks.begin(), rp.exclude_disks.end(), name) !=
          rp.exclude_disks.end()) {
        continue;
      }
      ojson entry = {
          {"name", name},
          {"id", d.value("id", "/disks/" + name)},
          {"sizeBytes", d.value("sizeBytes", uint64_t{0})},
          {"kind", d.value("kind", std::string("managed"))},
          {"diskRestorePoint", {{"id", DiskRestorePointId(rp.collection, rp.name, name)}}}};
      disks.push_back(std::move(entry));
    }
  }
  ojson source = {
      {"vmId", vm_name.empty() ? "" : "/vms/" + vm_name},
      {"vmName", vm_name},
      {"configuration", meta.contains("configuration") && !meta["configuration"].is_null()
                            ? ojson(meta["configuration"])
                            : ojson::object()},
      {"storageProfile", {{"disks", std::move(disks)}}}};

  ojson props = {{"excludeDisks", std::move(exclude)},
                 {"consistencyMode", rp.consistency_mode},
                 {"timeCreated", rp.time_created},
                 {"provisioningState", rp.provisioning_state},
                 {"sourceMetadata", std::move(source)}};
  if (!rp.source_restore_point.empty()) {
    props["sourceRestorePoint"] = {{"id", rp.source_restore_point}};
  }
  if (rp.provisioning_state == "Failed" || !rp.error_code.empty()) {
    props["error"] = {{"code", rp.error_code}, {"message", rp.error_message}};
  }
  if (instance_view) {
    ojson drps = ojson::array();
    for (const auto& d : rp.disk_restore_points) {
      drps.push_back({{"id", DiskRestorePointId(rp.collection, rp.name, d.disk)},
                      {"replicationStatus",
                       {{"status", d.status}, {"completionPercent", d.completion_percent}}}});
    }
    ojson status = {{"code", "ProvisioningState/" + Lower(rp.provisioning_state)},
                    {"level", rp.provisioning_state == "Failed" ? "Error" : "Info"},
                    {"displayStatus", "Provisioning " + Lower(rp.provisioning_state)}};
    if (!rp.error_message.empty()) status["message"] = rp.error_message;
    ojson view = {{"diskRestorePoints", std::move(drps)}, {"statuses", ojson::array({status})}};
    if (rp.cut_pause_ns >= 0) view["cutPauseMicroseconds"] = rp.cut_pause_ns / 1000;
    props["instanceView"] = std::move(view);
  }
  return ResourceJson(RestorePointId(rp.collection, rp.name), rp.name, kRestorePointType,
                      std::move(props));
}

ojson DiskRestorePointToJson(const RestorePointRecord& rp, const DiskRestorePointRecord& d) {
  ojson props = {
      {"sourceResourceId", "/disks/" + d.disk},
      {"sizeBytes", d.size_bytes},
      {"trackingGranularityBytes", d.granularity},
      {"incremental", !d.full},
      {"bytesStored", d.bytes_stored},
      {"blocksChanged", d.blocks_to_copy},
      {"replicationStatus", {{"status", d.status}, {"completionPercent", d.completion_percent}}}};
  // Exported (read-only) only once its data is committed in the store and the
  // point itself is (restore/point_exports.cpp serves nothing else): a disk of
  // a failed copy may say Succeeded while its data went with the point.
  if (d.status == "Succeeded" && rp.provisioning_state == "Succeeded") {
    props["export"] = {{"nbd", {{"name", rp.collection + "/" + rp.name + "/" + d.disk}}}};
  }
  return ResourceJson(DiskRestorePointId(rp.collection, rp.name, d.disk), d.disk,
                      kDiskRestorePointType, std::move(props));
}

void AddRestorePointRoutes(Router& router, RestoreService& restore) {
  RestoreService* svc = &restore;
  auto bind = [svc](HttpResponse (*fn)(RestoreService&, const RequestContext&)) {
    return [svc, fn](const RequestContext& c) { return fn(*svc, c); };
  };
  const std::string c = "/restorePointCollections";
  const std::string rp = c + "/{collection}/restorePoints/{restorePoint}";
  router.add("GET", "/regions", bind(ListRegions));
  router.add("POST", "/regions/{region}/repair", bind(RepairRegion));
  router.add("POST", "/regions/{region}/gc", bind(GcRegion), {"orphans"});
  router.add("GET", c, bind(ListCollections));
  router.add("GET", c + "/{collection}", bind(GetCollection), {"$expand"});
  router.add("PUT", c + "/{collection}", bind(PutCollection));
  router.add("DELETE", c + "/{collection}", bind(DeleteCollection));
  router.add("GET", c + "/{collection}/restorePoints", bind(ListRestorePoints));
  router.add("GET", rp, bind(GetRestorePoint), {"$expand"});
  router.add("PUT", rp, bind(PutRestorePoint));
  router.add("DELETE", rp, bind(DeleteRestorePoint));
  router.add("GET", rp + "/diskRestorePoints", bind(ListDiskRestorePoints));
  router.add("GET", rp + "/diskRestorePoints/{disk}", bind(GetDiskRestorePoint));
  router.add("POST", rp + "/verify", bind(Verify));
  router.add("POST", rp + "/restore", bind(Restore));
}

}  // namespace rpoint
