#include "control/service_handlers.h"

#include "control/api_version.h"

namespace rpoint {

void AddServiceRoutes(Router& router, DiskService& disks, const std::string& daemon_version) {
  router.add("GET", "/", [daemon_version](const RequestContext&) {
    return JsonResponse(200, {{"name", "rpointd"},
                              {"version", daemon_version},
                              {"apiVersions", SupportedApiVersions()},
                              {"latestApiVersion", LatestApiVersion()}});
  });
  DiskService* svc = &disks;
  router.add("GET", "/health", [svc](const RequestContext&) {
    // Degraded, not down: the daemon serves every disk it could open.
    int total = 0, unavailable = 0;
    for (const DiskRecord& d : svc->list()) {
      ++total;
      if (!d.error.empty()) ++unavailable;
    }
    return JsonResponse(200, {{"status", unavailable ? "Degraded" : "Healthy"},
                              {"disks", total},
                              {"unavailableDisks", unavailable}});
  });
}

}  // namespace rpoint
