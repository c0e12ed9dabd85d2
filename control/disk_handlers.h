// Disk routes of the control API (docs/api.md, "Disks"): PUT/GET/PATCH/DELETE
// /disks/{name} and GET /disks, translating JSON to DiskService calls and
// DiskRecords to Azure-shaped resources. A PUT with creationData restores a
// disk through the RestoreService; DELETE refuses a disk that is in a VM.
//
// Thread-safety: the handlers are safe from any thread (the services are).
#pragma once

#include <nlohmann/json.hpp>

#include "disks/disk_service.h"
#include "control/router.h"

namespace rpoint {

class RestoreService;

void AddDiskRoutes(Router& router, DiskService& disks, RestoreService& restore);

// {"id": "/disks/NAME", "name", "type": "rpoint/disks", "properties": {...}}
nlohmann::ordered_json DiskToJson(const DiskRecord& disk);

}  // namespace rpoint
