// VM routes of the control API (docs/api.md, "VMs"): PUT/GET/DELETE
// /vms/{name} and GET /vms. A VM names the disks that restore points capture
// together and keeps an opaque configuration that restore points carry.
//
// Thread-safety: the handlers are safe from any thread (RestoreService is).
#pragma once

#include <nlohmann/json.hpp>

#include "control/router.h"
#include "restore/restore_service.h"

namespace rpoint {

void AddVmRoutes(Router& router, RestoreService& restore);

// {"id": "/vms/NAME", "name", "type": "rpoint/vms", "properties": {...}}
nlohmann::ordered_json VmToJson(const VmRecord& vm);

}  // namespace rpoint
