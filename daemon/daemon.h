// RunDaemon: the life of the rpointd process after its configuration is known.
//
// Start-up: state directory (0700) and its lock, listening sockets (from
// systemd or made here), DiskService, reactor pool, NBD and control servers,
// then READY=1 to systemd. Then it waits for signals on the calling thread
// (which must have SIGTERM, SIGINT and SIGHUP blocked, as every thread it
// starts inherits): SIGHUP re-reads log.level and the TLS files, SIGTERM/SIGINT shut down in
// order (STOPPING=1, control server, NBD drain, sync every disk).
//
// Thread-safety: call once, from the main thread.
#pragma once

#include <optional>
#include <string>

#include "config/config.h"

namespace rpoint {

struct DaemonOptions {
  std::string version;
  // What the configuration was built from, to rebuild it on SIGHUP.
  std::optional<std::string> config_path;
  std::optional<std::string> state_dir_flag;
  std::optional<std::string> log_level_flag;
};

// Exit status for main: 0 after a clean shutdown, 1 when start-up or shutdown failed.
int RunDaemon(const Config& config, const DaemonOptions& options);

// The configuration from the flags: file (or defaults), overrides, defaults
// filled in. Shared by start-up and SIGHUP.
Result<Config> BuildConfig(const DaemonOptions& options);

}  // namespace rpoint
