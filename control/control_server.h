// ControlServer: the JSON-over-HTTP/1.1 control API on a Unix socket.
//
// Routes requests (see docs/api.md) to the services and renders Azure-shaped
// resources and errors ({"error": {"code", "message"}}). Runs on its own
// threads, never on a reactor.
//
// Thread-safety: add_listener/start/stop from the owning (main) thread.
#pragma once

#include <memory>

#include "common/status.h"
#include "common/unique_fd.h"
#include "control/disk_service.h"

namespace rpoint {

struct ControlServerOptions {
  std::string version;  // daemon version, reported by GET /
};

class ControlServer {
 public:
  static Result<std::unique_ptr<ControlServer>> Create(DiskService& disks,
                                                       ControlServerOptions options);
  virtual ~ControlServer() = default;
  // A Unix stream socket already bound and listening.
  virtual Status add_listener(UniqueFd listening_fd) = 0;
  virtual void start() = 0;
  // Stops accepting and closes connections once their current request is answered.
  virtual void stop() = 0;
};

}  // namespace rpoint
