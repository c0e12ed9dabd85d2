// Service routes of the control API: GET / (daemon version and the API
// versions it serves) and GET /health.
//
// Thread-safety: the handlers are safe from any thread.
#pragma once

#include <string>

#include "disks/disk_service.h"
#include "control/router.h"

namespace rpoint {

void AddServiceRoutes(Router& router, DiskService& disks, const std::string& daemon_version);

}  // namespace rpoint
