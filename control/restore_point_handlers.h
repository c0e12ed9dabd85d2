// Restore point routes of the control API (docs/api.md, "Restore points"):
// regions, restore point collections, restore points, disk restore points,
// and the verify and restore actions. Thin translations of RestoreService
// calls and records into Azure-shaped resources; the long-running ones answer
// 201/202 with the operation to poll (see operation_handlers.h).
//
// Thread-safety: the handlers are safe from any thread (RestoreService is).
#pragma once

#include <nlohmann/json.hpp>

#include "control/router.h"
#include "restore/restore_service.h"

namespace rpoint {

void AddRestorePointRoutes(Router& router, RestoreService& restore);

nlohmann::ordered_json CollectionToJson(const CollectionRecord& c);
// `instance_view`: add properties.instanceView (?$expand=instanceView).
nlohmann::ordered_json RestorePointToJson(const RestorePointRecord& rp, bool instance_view);
nlohmann::ordered_json DiskRestorePointToJson(const RestorePointRecord& rp,
                                              const DiskRestorePointRecord& d);

}  // namespace rpoint
