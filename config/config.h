// Config: the daemon's configuration, from YAML (yaml-cpp) or built-in defaults.
//
// Every key is documented in config/rpointd.yaml. Unknown keys, wrong types and
// bad values are errors that name the key and its line.
// Thread-safety: a plain value.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/status.h"

namespace rpoint {

struct TcpAddress {
  std::string host;  // IPv4/IPv6 literal or name
  uint16_t port = 10809;
};

struct Config {
  std::string state_dir = "/var/lib/rpointd";
  std::string control_socket;           // default: <state_dir>/control.sock
  uint32_t control_socket_mode = 0660;  // octal in YAML, e.g. "0660"
  std::string nbd_socket;               // default: <state_dir>/nbd.sock
  std::optional<TcpAddress> nbd_tcp;    // unset: no TCP listener
  std::string log_level = "info";
  unsigned io_queue_depth = 256;        // io_uring entries per reactor
  unsigned io_threads = 0;              // reactors; 0 = one per CPU
  bool direct_io = false;               // O_DIRECT for aligned I/O
  std::string disks_dir;                // default: <state_dir>/disks
  std::string metadata_db;              // default: <state_dir>/metadata.db
};

// Parses YAML text; `source` names it in error messages (a path or "<string>").
Result<Config> ParseConfig(const std::string& yaml_text, const std::string& source);
Result<Config> LoadConfigFile(const std::string& path);
// Fills empty paths from state_dir; validates the result.
Status FinalizeConfig(Config& config);

}  // namespace rpoint
