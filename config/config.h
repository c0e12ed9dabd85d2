// Config: the daemon's configuration, from YAML (yaml-cpp) or built-in defaults.
//
// Every key is documented in config/rpointd.yaml (and docs/config.md). Unknown
// keys, wrong types and bad values are errors that name the key and its line,
// as "<file>:<line>:<column>: <key>: <what is wrong>".
//
// Paths: a relative state_dir in a config file is taken relative to the
// directory holding that file (relative to the working directory when parsed
// from a string or given as --state-dir); the other paths, when relative, are
// taken relative to state_dir. FinalizeConfig makes every path absolute.
//
// Thread-safety: a plain value.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace rpoint {

struct TcpAddress {
  std::string host;  // IPv4/IPv6 literal or name
  uint16_t port = 10809;
};

// A restore point store (filled in by the restore point issue; parsed and
// validated already so configs written now keep working).
struct RegionConfig {
  std::string name;        // like a disk name: [A-Za-z0-9._-], 1-63 chars
  std::string path;        // absolute
  bool is_default = false; // exactly one region is the default
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

  // --- additions (config engineer) ---
  uint32_t nbd_socket_mode = 0660;      // the NBD Unix socket gives full access to every disk
  std::vector<RegionConfig> regions;    // empty: no restore point store configured

  // Where each key's value came from, for error messages: dotted key
  // ("io.queue_depth") -> "<file>:<line>:<column>" or a flag name ("--state-dir").
  // Callers that override a key set its origin too.
  std::map<std::string, std::string> origins;
};

// Parses YAML text; `source` names it in error messages (a path or "<string>").
Result<Config> ParseConfig(const std::string& yaml_text, const std::string& source);
Result<Config> LoadConfigFile(const std::string& path);
// Fills empty paths from state_dir; validates the result. Idempotent.
Status FinalizeConfig(Config& config);

// The configuration as YAML that ParseConfig accepts (--check-config prints it).
std::string ConfigToYaml(const Config& config);
// "host:port", with IPv6 literals in brackets: "[::1]:10809".
std::string FormatTcpAddress(const TcpAddress& address);
// Every key the parser accepts, dotted ("io.queue_depth", "regions[].name").
const std::vector<std::string>& ConfigKeys();
// The default region, or nullptr when none is configured (after FinalizeConfig).
const RegionConfig* DefaultRegion(const Config& config);

}  // namespace rpoint
