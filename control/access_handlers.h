// Access grant routes of the control API (docs/api.md, "Access grants"):
// POST .../diskRestorePoints/{disk}/beginGetAccess and .../endGetAccess. Thin
// translations of AccessGrants calls; beginGetAccess answers 202 with the
// operation (already Succeeded) whose output carries accessSAS.
//
// Thread-safety: the handlers are safe from any thread (AccessGrants is).
#pragma once

#include "control/router.h"
#include "restore/access_grants.h"

namespace rpoint {

void AddAccessRoutes(Router& router, AccessGrants& grants);

}  // namespace rpoint
