// Disk routes of the control API (docs/api.md, "Disks"): PUT/GET/PATCH/DELETE
// /disks/{name} and GET /disks, translating JSON to DiskService calls and
// DiskRecords to Azure-shaped resources.
//
// Thread-safety: the handlers are safe from any thread (DiskService is).
#pragma once

#include <nlohmann/json.hpp>

#include "control/disk_service.h"
#include "control/router.h"

namespace rpoint {

void AddDiskRoutes(Router& router, DiskService& disks);

// {"id": "/disks/NAME", "name", "type": "rpoint/disks", "properties": {...}}
nlohmann::ordered_json DiskToJson(const DiskRecord& disk);

}  // namespace rpoint
