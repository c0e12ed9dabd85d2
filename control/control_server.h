// ControlServer: the JSON-over-HTTP/1.1 control API on a Unix socket.
//
// Routes requests (see docs/api.md) to the services and renders Azure-shaped
// resources and errors ({"error": {"code", "message"}}). Runs on its own
// threads, never on a reactor: one I/O thread serves every connection
// (control/http_connection.h) and `handler_threads` workers run the handlers.
//
// Thread-safety: add_listener/start/stop from the owning (main) thread.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "common/status.h"
#include "common/unique_fd.h"
#include "disks/disk_service.h"

namespace rpoint {

class RestoreService;
class AccessGrants;

struct ControlServerOptions {
  std::string version;  // daemon version, reported by GET /
  // Larger request bodies are answered 413 (requests are small JSON objects).
  size_t max_body_bytes = 1u << 20;
  // Connections open at once (capped at half the descriptor limit). At the
  // cap an idle connection is closed to make room; when none is idle the new
  // one is answered 503.
  unsigned max_connections = 1024;
  // Worker threads that run request handlers (which may block on SQLite).
  unsigned handler_threads = 4;
  // A connection with no request started for this long is closed.
  unsigned idle_timeout_seconds = 60;
  // A request must arrive completely, and its response drain, within this long.
  unsigned request_timeout_seconds = 30;
  // beginGetAccess/endGetAccess routes when set (outlives the server).
  AccessGrants* access_grants = nullptr;
};

class ControlServer {
 public:
  static Result<std::unique_ptr<ControlServer>> Create(DiskService& disks, RestoreService& restore,
                                                       ControlServerOptions options);
  virtual ~ControlServer() = default;
  // A Unix stream socket already bound and listening.
  virtual Status add_listener(UniqueFd listening_fd) = 0;
  virtual void start() = 0;
  // Stops accepting and closes connections once their current request is answered.
  // Blocks until every connection has closed; idempotent. Call it (or
  // destroy the server) before the DiskService or RestoreService goes away.
  virtual void stop() = 0;
};

}  // namespace rpoint
