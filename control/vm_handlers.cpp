#include "control/vm_handlers.h"

#include <set>

#include "disks/disk_service.h"
#include "control/handler_common.h"

namespace rpoint {

namespace {

using nlohmann::json;

constexpr const char* kVmType = "rpoint/vms";

ResourceRules VmRules(const std::string& name) {
  ResourceRules r;
  r.id = "/vms/" + name;
  r.name = name;
  r.type = kVmType;
  r.settable = {"disks", "configuration"};
  r.raw_property = "configuration";  // opaque: kept byte for byte
  r.read_only = {"timeCreated", "provisioningState"};
  return r;
}

HttpResponse PutVm(RestoreService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  ResourceBody body;
  HttpResponse err;
  if (!ReadResourceBody(ctx, VmRules(name), false, &body, &err)) return err;
  const json& props = body.properties;

  auto it = props.find("disks");
  if (it == props.end()) {
    return ErrorResponse(Status::InvalidArgument(
        "properties.disks is required: the VM's disks, e.g. [{\"id\": \"/disks/a\"}]"));
  }
  if (!it->is_array()) {
    return ErrorResponse(
        Status::InvalidArgument("properties.disks must be a list of {\"id\": "
                                "\"/disks/NAME\"}, got " +
                                it->dump()));
  }
  std::vector<std::string> disks;
  std::set<std::string> seen;
  for (size_t i = 0; i < it->size(); ++i) {
    std::string where = "properties.disks[" + std::to_string(i) + "]";
    auto disk = ReferenceField((*it)[i], "/disks/", where);
    if (!disk.ok()) return ErrorResponse(disk.status());
    if (!seen.insert(disk.value()).second) {
      return ErrorResponse(Status::InvalidArgument("disk '" + disk.value() +
                                                   "' is listed twice in properties.disks"));
    }
    // The service refuses this too, as an invalid argument; the API promises
    // 409 (the disk is fine, it is just taken).
    if (auto owner = svc.vm_of_disk(disk.value()); owner && *owner != name) {
      return ErrorResponse(409, "Conflict",
                           "disk '" + disk.value() + "' is already in VM '" + *owner + "'");
    }
    disks.push_back(disk.value());
  }
  json configuration = json::object();
  if (auto c = props.find("configuration"); c != props.end() && !c->is_null()) {
    configuration = *c;
  }

  auto r = svc.put_vm(name, disks, configuration);
  if (!r.ok()) return ErrorResponse(r.status());
  return JsonResponse(r->second ? 201 : 200, VmToJson(r->first));
}

HttpResponse GetVm(RestoreService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  if (Status s = DiskService::ValidateName(name, "VM name"); !s.ok()) return ErrorResponse(s);
  auto vm = svc.get_vm(name);
  if (!vm.ok()) return ErrorResponse(vm.status());
  return JsonResponse(200, VmToJson(vm.value()));
}

HttpResponse ListVms(RestoreService& svc, const RequestContext&) {
  nlohmann::ordered_json value = nlohmann::ordered_json::array();
  for (const VmRecord& vm : svc.list_vms()) value.push_back(VmToJson(vm));
  return ListResponse(std::move(value));
}

HttpResponse DeleteVm(RestoreService& svc, const RequestContext& ctx) {
  const std::string& name = ctx.params[0];
  if (Status s = DiskService::ValidateName(name, "VM name"); !s.ok()) return ErrorResponse(s);
  Status s = svc.delete_vm(name);
  if (!s.ok()) return ErrorResponse(s);
  return EmptyResponse(204);
}

}  // namespace

nlohmann::ordered_json VmToJson(const VmRecord& vm) {
  nlohmann::ordered_json disks = nlohmann::ordered_json::array();
  for (const std::string& d : vm.disks) disks.push_back({{"id", "/disks/" + d}, {"name", d}});
  nlohmann::ordered_json props = {
      {"disks", std::move(disks)},
      {"configuration", vm.configuration.is_null() ? nlohmann::ordered_json::object()
                                                   : nlohmann::ordered_json(vm.configuration)},
      {"timeCreated", vm.time_created},
      {"provisioningState", "Succeeded"},
  };
  return ResourceJson("/vms/" + vm.name, vm.name, kVmType, std::move(props));
}

void AddVmRoutes(Router& router, RestoreService& restore) {
  RestoreService* svc = &restore;
  router.add("GET", "/vms", [svc](const RequestContext& c) { return ListVms(*svc, c); });
  router.add("GET", "/vms/{name}", [svc](const RequestContext& c) { return GetVm(*svc, c); });
  router.add("PUT", "/vms/{name}", [svc](const RequestContext& c) { return PutVm(*svc, c); });
  router.add("DELETE", "/vms/{name}", [svc](const RequestContext& c) { return DeleteVm(*svc, c); });
}

}  // namespace rpoint
