// Operation routes of the control API (docs/api.md, "Operations"):
// GET /operations/{id}, the status of a long-running job (creating a restore
// point, restoring a disk or a VM, verifying) that a 201/202 pointed at.
//
// Thread-safety: the handlers are safe from any thread (RestoreService is).
#pragma once

#include <nlohmann/json.hpp>

#include "control/router.h"
#include "restore/restore_service.h"

namespace rpoint {

class AccessGrants;

// `grants` (may be null) answers its BeginGetAccess operations, which it keeps
// in memory only (their output holds a token).
void AddOperationRoutes(Router& router, RestoreService& restore, AccessGrants* grants = nullptr);

// {"id": "/operations/ID", "name", "status", "startTime", ["endTime"],
//  "percentComplete", ["error"], "properties": {"kind", "resourceId", ["output"]}}
nlohmann::ordered_json OperationToJson(const OperationRecord& op);

}  // namespace rpoint
