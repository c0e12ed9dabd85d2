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

// ublk.max_io_bytes bounds: a page, and the 32 MiB a tag's window in the
// driver's user-copy address space holds (UBLK_IO_BUF_BITS; ublk/control.h
// kUblkMaxIoBytes, checked equal in daemon/).
inline constexpr uint32_t kMinUblkIoBytes = 4096;
inline constexpr uint32_t kMaxUblkIoBytes = 32u << 20;

struct TcpAddress {
  std::string host;  // IPv4/IPv6 literal or name
  uint16_t port = 10809;
};

// A restore point store.
struct RegionConfig {
  std::string name;        // like a disk name: [A-Za-z0-9._-], 1-63 chars
  std::string path;        // absolute
  bool is_default = false; // exactly one region is the default
  // A region on another rpointd host (then `path` is empty): that host's
  // peers.listen address and the name of the region there.
  std::string peer = {};         // "host:port"
  std::string peer_region = {};  // default: "local"
  bool remote() const { return !peer.empty(); }
};

// Commands run around a FileSystemConsistent restore point's cut (/bin/sh -c).
// Empty: no hook.
struct HookConfig {
  std::string freeze;
  std::string thaw;
};

// The `consistency:` block. A VM listed under `vms` takes its freeze/thaw from
// there; a field it leaves out (absent or null) falls back to the top-level
// one, and an empty string means "no hook" for that VM (EffectiveHooks).
struct ConsistencyConfig {
  unsigned hook_timeout_seconds = 60;
  HookConfig defaults;
  struct VmHooks {
    std::optional<std::string> freeze;
    std::optional<std::string> thaw;
  };
  std::map<std::string, VmHooks> vms;
};

// How long ended long-running operations stay queryable (GET /operations,
// GET /operations/{id}). An operation still InProgress is never pruned.
struct OperationsConfig {
  unsigned retention_seconds = 86400;  // ended more than this long ago: pruned
  unsigned max_count = 10000;          // beyond this many ended ones: the oldest pruned
};

// The `tls:` block: keys for NBD over TLS (and, later, peer connections).
struct TlsFileConfig {
  std::string dir;       // ca-cert.pem, server-cert.pem, server-key.pem (+ client-*); "" = none
  std::string psk_file;  // psktool(1) file, "identity:hexkey" lines; "" = none
  bool verify_peer = true;  // X.509 clients must present a certificate the CA signed
  bool configured() const { return !dir.empty() || !psk_file.empty(); }
};

// The `access:` block: the URIs access grants (beginGetAccess) hand out.
struct AccessConfig {
  // Which NBD listener grant URIs name when a request does not say: "tcp"
  // (nbd[s]://host:port/TOKEN) or "unix" (nbd+unix:///TOKEN?socket=PATH).
  // FinalizeConfig: "tcp" when nbd.tcp is set, else "unix".
  std::string listener;
  // The host in TCP grant URIs, as clients reach it. FinalizeConfig: nbd.tcp's
  // host (set it when that is a wildcard such as 0.0.0.0).
  std::string host;
  uint64_t max_duration_seconds = 7 * 86400;  // the longest durationInSeconds granted
  // The TCP listener serves access grant tokens only: no disk, no point by
  // its name, nothing listed (the Unix socket still serves everything).
  bool tcp_grants_only = false;
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
  // Empty in the file: FinalizeConfig adds the default region "local" at
  // <state_dir>/regions/local.
  std::vector<RegionConfig> regions;
  TlsFileConfig tls;
  // "off" | "allow" | "require" (nbd/tls_config.h TlsMode). nbd_tls is for the
  // TCP listeners: "" resolves to "require" when `tls` is configured, else
  // "off". nbd_unix_tls is for the Unix socket (its file mode already limits
  // who connects): "" resolves to "off".
  std::string nbd_tls;
  std::string nbd_unix_tls;
  std::string tracking_dir;             // default: <state_dir>/tracking (change bitmaps)
  std::string staging_dir;              // default: <state_dir>/staging (copy-before-write)
  ConsistencyConfig consistency;
  OperationsConfig operations;
  // Where disks may be adopted from (PUT /disks/x {"path": ...}): a path is
  // accepted only when its real path lies inside one of these directories.
  // Adopting exposes the file or device read-write to NBD clients, so the
  // list bounds what the control socket's users can reach. Absolute; "/"
  // allows everything; [] refuses adoption. rpointd's own directories are
  // refused whatever this says.
  std::vector<std::string> adopt_paths = {"/dev", "/srv/vm-images", "/var/lib/libvirt/images"};
  // Pack files the daemon keeps open, all regions together (store/pack_cache.h):
  // packs nobody reads beyond this are closed, least recently used first.
  unsigned store_open_packs = 128;
  AccessConfig access;
  // ublk (disks with export "ublk"): hardware queues of each /dev/ublkbN (one
  // thread each; 0 = one per CPU) and requests in flight per queue.
  unsigned ublk_queues = 0;
  unsigned ublk_depth = 128;
  // ublk.user_copy: new devices copy request data in rpointd (UBLK_F_USER_COPY,
  // kernels 6.5+) instead of in the driver; false (the default: the driver's
  // copy measured faster, bench/RESULTS.md 2026-12-02), or an older kernel:
  // the driver's copy into a per-tag buffer.
  bool ublk_user_copy = false;
  // ublk.zero_copy: "auto" (the default): new devices use zero copy when the
  // driver offers it (UBLK_F_AUTO_BUF_REG, 6.16+): the request's pages are
  // read and written in place, no copy by anyone; ahead of user_copy. "on":
  // the same, but a device is not made without it; "off": never.
  std::string ublk_zero_copy = "auto";
  // ublk.taskrun: how each queue's ring runs the driver's task work ("defer":
  // SINGLE_ISSUER + DEFER_TASKRUN, "coop": COOP_TASKRUN, "plain"); a kernel
  // without the flags gets the next weaker one. Default plain: defer and coop
  // did not win consistently (bench/RESULTS.md 2026-12-02 02:11).
  std::string ublk_taskrun = "plain";
  // ublk.pin_queues: each queue's thread runs only on the CPUs the driver maps
  // to that queue (GET_QUEUE_AFFINITY).
  bool ublk_pin_queues = false;
  // ublk.max_io_bytes: the largest request a new device takes
  // (max_io_buf_bytes; /sys/block/ublkbN/queue/max_hw_sectors_kb), a power of
  // two from kMinUblkIoBytes to kMaxUblkIoBytes. Each tag has a buffer this
  // big (touched only when used). 1 MiB: a 1 MiB request is not split in two
  // (the old fixed 512 KiB split it; 2 MiB measured no better, bench/RESULTS.md).
  uint32_t ublk_max_io_bytes = 1024 * 1024;

  // peers.listen: the HTTPS (mutual TLS, keys from tls.dir) address other
  // rpointd hosts call to keep regions here; unset: none.
  std::optional<TcpAddress> peers_listen;
  // peers.deadline_seconds: how long a copy to or from a peer keeps retrying
  // without progress (a cut link, a peer restarting) before it fails.
  unsigned peers_deadline_seconds = 120;

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
// The default region, or nullptr when none is configured (after FinalizeConfig
// there always is one).
const RegionConfig* DefaultRegion(const Config& config);
// The hooks a VM gets: its own entry merged over the top-level defaults.
HookConfig EffectiveHooks(const ConsistencyConfig& consistency, const std::string& vm);

}  // namespace rpoint
