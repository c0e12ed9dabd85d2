#include "daemon/daemon.h"

#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <sstream>
#include <thread>
#include <vector>

#include "common/fault_injection.h"
#include "common/logging.h"
#include "control/control_server.h"
#include "control/peer_server.h"
#include "daemon/composite_resolver.h"
#include "daemon/listeners.h"
#include "daemon/state_dir.h"
#include "disks/disk_service.h"
#include "engine/reactor.h"
#include "nbd/server.h"
#include "restore/access_grants.h"
#include "restore/restore_service.h"
#include "ublk/service.h"

namespace rpoint {
namespace {

unsigned UsableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  unsigned n = std::thread::hardware_concurrency();
  return n ? n : 1;
}

sigset_t DaemonSignals() {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGTERM);
  sigaddset(&s, SIGINT);
  sigaddset(&s, SIGHUP);
  return s;
}

// Once shutdown has begun, a second SIGTERM/SIGINT means "stop now": an
// operator pressing Ctrl-C twice, or an admin giving up on a stuck drain.
void StartForcedExitWatcher() {
  std::thread([] {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGTERM);
    sigaddset(&s, SIGINT);
    int sig = 0;
    while (sigwait(&s, &sig) != 0) {
    }
    static const char kMsg[] = "rpointd: second signal during shutdown, exiting without finishing\n";
    ssize_t ignored = write(2, kMsg, sizeof kMsg - 1);
    (void)ignored;
    _exit(1);
  }).detach();
}

void Reload(const DaemonOptions& options, Config& current) {
  Result<Config> fresh = BuildConfig(options);
  if (!fresh.ok()) {
    spdlog::error("SIGHUP: keeping the running configuration: {}", fresh.status().message());
    return;
  }
  spdlog::level::level_enum level;
  if (ParseLogLevel(fresh->log_level, &level).ok()) {
    spdlog::set_level(level);
    spdlog::default_logger()->set_level(level);
  }
  std::string before = current.log_level;
  Config compare = fresh.value();
  compare.log_level = current.log_level;
  bool others_changed = ConfigToYaml(compare) != ConfigToYaml(current);
  current.log_level = fresh->log_level;
  spdlog::info("SIGHUP: log level {} (was {}){}", current.log_level, before,
               others_changed ? "; other configuration changes take effect on restart" : "");
}

// SIGHUP: reads the TLS certificate, key, CA, CRL and PSK files again from the
// running tls.dir / tls.psk_file. New NBD handshakes use them; connections
// already made keep theirs. Anything wrong keeps the credentials in use.
void ReloadTls(const Config& config, NbdServer& nbd) {
  if (!config.tls.configured()) return;
  nbd::TlsSettings settings{config.tls.dir, config.tls.psk_file, config.tls.verify_peer};
  auto creds = nbd::TlsCredentials::LoadServer(settings);
  if (!creds.ok()) {
    spdlog::error("SIGHUP: keeping the TLS credentials in use: {}", creds.status().message());
    return;
  }
  nbd.set_tls_credentials(std::move(creds).value());
  spdlog::info("SIGHUP: TLS credentials reloaded{}{}",
               config.tls.dir.empty() ? "" : " from " + config.tls.dir,
               config.tls.psk_file.empty() ? "" : " (PSK " + config.tls.psk_file + ")");
}

// Testing aid (docs/testing.md): RPOINTD_FAULTS arms fault points at start,
// RPOINTD_FAULTS_FILE at start (when RPOINTD_FAULTS is unset) and on SIGHUP.
Status ArmFaults(bool at_start) {
  const bool from_env = at_start && std::getenv("RPOINTD_FAULTS") != nullptr;
  if (!from_env && !std::getenv("RPOINTD_FAULTS_FILE")) return Status::Ok();
  Status st = from_env ? fault::ArmFromEnvironment() : fault::ReloadFromFile();
  if (!st.ok()) return st;
  spdlog::warn("fault injection: rules now {} (a testing aid, never for production)",
               fault::Describe());
  return Status::Ok();
}

// Copies to a peer region share their source points as access grants
// (restore/peer_link.h): the peer reads them over NBD with TLS.
class GrantSharer final : public PointSharer {
 public:
  explicit GrantSharer(AccessGrants& grants) : grants_(grants) {}
  Result<std::string> share(const std::string& c, const std::string& rp, const std::string& d,
                            uint64_t seconds) override {
    auto g = grants_.begin_get_access(c, rp, d, "Read", seconds, "tcp");
    if (!g.ok() && g.status().code() == Code::kConflict) {
      // A grant from before a restart, whose token is gone: replace it.
      (void)grants_.end_get_access(c, rp, d);
      g = grants_.begin_get_access(c, rp, d, "Read", seconds, "tcp");
    }
    if (!g.ok()) return g.status();
    if (g->record.access_sas.rfind("nbds://", 0) != 0) {
      (void)grants_.end_get_access(c, rp, d);
      return Status::Unsupported(
          "a copy to a peer needs the NBD TCP listener with TLS (nbd.tcp, nbd.tls)");
    }
    return g->record.access_sas;
  }
  void unshare(const std::string& c, const std::string& rp, const std::string& d) override {
    (void)grants_.end_get_access(c, rp, d);
  }

 private:
  AccessGrants& grants_;
};

RestoreServiceOptions RestoreOptions(const Config& config) {
  RestoreServiceOptions o;
  for (const RegionConfig& r : config.regions) {
    o.regions.push_back({r.name, r.path, r.is_default, r.peer, r.peer_region});
  }
  o.peer_tls_dir = config.tls.dir;
  o.peer_deadline_seconds = config.peers_deadline_seconds;
  o.metadata_db = config.metadata_db;
  o.tracking_dir = config.tracking_dir;
  o.staging_dir = config.staging_dir;
  const ConsistencyConfig& cc = config.consistency;
  o.default_hooks = {cc.defaults.freeze, cc.defaults.thaw};
  // The service takes a listed VM's hooks as they are: merge in the defaults here.
  for (const auto& [vm, hooks] : cc.vms) {
    HookConfig h = EffectiveHooks(cc, vm);
    o.vm_hooks[vm] = {h.freeze, h.thaw};
  }
  o.hook_timeout_seconds = cc.hook_timeout_seconds;
  o.operation_retention_seconds = config.operations.retention_seconds;
  o.operation_max_count = config.operations.max_count;
  o.open_packs = config.store_open_packs;
  return o;
}

DiskServiceOptions DiskOptions(const Config& config) {
  DiskServiceOptions o;
  o.disks_dir = config.disks_dir;
  o.metadata_db = config.metadata_db;
  o.direct_io = config.direct_io;
  o.tracking_dir = config.tracking_dir;
  o.reserved_dirs = {config.state_dir,
                     std::filesystem::path(config.metadata_db).parent_path().string(),
                     config.tracking_dir, config.staging_dir};
  for (const RegionConfig& r : config.regions) {
    if (!r.remote()) o.reserved_dirs.push_back(r.path);
  }
  o.adopt_paths = config.adopt_paths;
  return o;
}

// Where access grant URIs point: the configured TCP address (host from
// access.host) or the first TCP socket systemd passed, and the Unix socket.
AccessGrantOptions AccessOptions(const Config& config, const std::vector<Listener>& listeners) {
  AccessGrantOptions o;
  o.metadata_db = config.metadata_db;
  o.default_listener = config.access.listener;
  o.max_duration_seconds = config.access.max_duration_seconds;
  // A listener that speaks TLS (nbd.tls, nbd.unix_tls: allow or require)
  // gets nbds:// URIs, so a client never sends the token in the clear there.
  o.tcp_tls = !config.nbd_tls.empty() && config.nbd_tls != "off";
  o.unix_tls = !config.nbd_unix_tls.empty() && config.nbd_unix_tls != "off";
  if (config.nbd_tcp) {
    TcpAddress a = *config.nbd_tcp;
    if (!config.access.host.empty()) a.host = config.access.host;
    o.tcp_address = FormatTcpAddress(a);
  }
  for (const Listener& l : listeners) {
    const bool is_unix = l.address.rfind("unix:", 0) == 0;
    if (is_unix && o.unix_socket.empty()) o.unix_socket = l.address.substr(5);
    if (!is_unix && o.tcp_address.empty() && l.address.rfind("tcp:", 0) == 0) {
      o.tcp_address = l.address.substr(4);
    }
  }
  return o;
}

std::string JoinAddresses(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& a : v) out += (out.empty() ? "" : ", ") + a;
  return out;
}

}  // namespace

Result<Config> BuildConfig(const DaemonOptions& options) {
  Config config;
  if (options.config_path) {
    Result<Config> loaded = LoadConfigFile(*options.config_path);
    if (!loaded.ok()) return loaded.status();
    config = std::move(loaded.value());
  }
  if (options.state_dir_flag) {
    config.state_dir = *options.state_dir_flag;
    config.origins["state_dir"] = "--state-dir";
  }
  if (options.log_level_flag) {
    config.log_level = *options.log_level_flag;
    config.origins["log.level"] = "--log-level";
  }
  if (Status st = FinalizeConfig(config); !st.ok()) return st;
  return config;
}

int RunDaemon(const Config& initial, const DaemonOptions& options) {
  Config config = initial;
  auto fail = [](const std::string& what, const Status& st) {
    spdlog::critical("{}: {}", what, st.message());
    sd_notifyf(0, "STATUS=Failed to start: %s: %s", what.c_str(), st.message().c_str());
    return 1;
  };
  spdlog::info("rpointd {} starting (pid {}), state directory {}", options.version, getpid(), config.state_dir);
  // One line per setting: the journal splits multi-line messages into entries
  // that lose their priority.
  {
    std::istringstream yaml(ConfigToYaml(config));
    for (std::string line; std::getline(yaml, line);) spdlog::debug("config: {}", line);
  }

  // --- state directory and lock ---
  // Everything rpointd creates (databases and their -wal/-shm, packs,
  // tracking bitmaps, staging files, directories) is private to its user,
  // whatever umask it was started with: the files hold every disk's data.
  // Sockets get their configured modes explicitly (ListenUnix).
  umask(077);
  if (Status st = MakeDirs(config.state_dir, 0700); !st.ok()) return fail("state directory", st);
  if (Status st = TightenDirectory(config.state_dir); !st.ok()) return fail("state directory", st);
  Result<StateLock> lock = StateLock::Acquire(config.state_dir);
  if (!lock.ok()) return fail("state directory", lock.status());
  namespace fs = std::filesystem;
  for (const std::string& dir : {config.disks_dir, fs::path(config.metadata_db).parent_path().string(),
                                 config.tracking_dir, config.staging_dir}) {
    if (Status st = MakeDirs(dir, 0700); !st.ok()) return fail("state directory", st);
  }
  // A region's store makes its own directory; its parent must be there (the
  // default region lives in <state_dir>/regions/).
  for (const RegionConfig& r : config.regions) {
    if (r.remote()) continue;  // kept by a peer: no directory here
    if (Status st = MakeDirs(fs::path(r.path).parent_path().string(), 0700); !st.ok()) {
      return fail("region " + r.name, st);
    }
  }

  // --- listening sockets: systemd's first, then whatever is still missing ---
  Result<ActivatedSockets> activated = TakeActivatedSockets();
  if (!activated.ok()) return fail("socket activation", activated.status());
  for (const auto& name : activated->ignored) {
    spdlog::warn("socket activation: ignoring socket {} (known names: control, nbd, nbd-*)", name);
  }
  std::optional<Listener> control_listener = std::move(activated->control);
  std::vector<Listener> nbd_listeners = std::move(activated->nbd);
  bool have_nbd_unix = false, have_nbd_tcp = false;
  for (const auto& l : nbd_listeners) (IsUnixSocket(l.fd.get()) ? have_nbd_unix : have_nbd_tcp) = true;

  // Parent directories of sockets stay traversable (0755) so a group given
  // access through the socket mode can reach them.
  if (!control_listener) {
    if (Status st = MakeDirs(fs::path(config.control_socket).parent_path().string(), 0755); !st.ok()) {
      return fail("control socket", st);
    }
    Result<Listener> l = ListenUnix(config.control_socket, config.control_socket_mode);
    if (!l.ok()) return fail("control socket", l.status());
    control_listener = std::move(l.value());
  }
  if (!have_nbd_unix) {
    if (Status st = MakeDirs(fs::path(config.nbd_socket).parent_path().string(), 0755); !st.ok()) {
      return fail("NBD socket", st);
    }
    Result<Listener> l = ListenUnix(config.nbd_socket, config.nbd_socket_mode);
    if (!l.ok()) return fail("NBD socket", l.status());
    nbd_listeners.push_back(std::move(l.value()));
  }
  if (!have_nbd_tcp && config.nbd_tcp) {
    Result<std::vector<Listener>> tcp = ListenTcp(*config.nbd_tcp);
    if (!tcp.ok()) return fail("NBD TCP listener", tcp.status());
    for (auto& l : tcp.value()) nbd_listeners.push_back(std::move(l));
  }

  if (Status st = ArmFaults(true); !st.ok()) return fail("fault injection", st);

  // --- services ---
  // ublk devices: recovered (or made) as the disk service opens the disks.
  // It outlives the disk service, which serves disks through it.
  UblkServiceOptions ublk_options;
  ublk_options.device.queues = config.ublk_queues ? config.ublk_queues : UsableCpus();
  ublk_options.device.depth = config.ublk_depth;
  ublk_options.device.user_copy = config.ublk_user_copy;
  ublk_options.device.zero_copy = config.ublk_zero_copy == "on" ? UblkDeviceOptions::ZeroCopy::kOn
                                  : config.ublk_zero_copy == "off"
                                      ? UblkDeviceOptions::ZeroCopy::kOff
                                      : UblkDeviceOptions::ZeroCopy::kAuto;
  ublk_options.device.ring_mode = config.ublk_taskrun == "defer"  ? Reactor::RingMode::kDefer
                                  : config.ublk_taskrun == "coop" ? Reactor::RingMode::kCoop
                                                                  : Reactor::RingMode::kPlain;
  ublk_options.device.pin_queues = config.ublk_pin_queues;
  static_assert(kMaxUblkIoBytes == kUblkMaxIoBytes, "config and ublk agree on the largest I/O");
  ublk_options.device.max_io_bytes = config.ublk_max_io_bytes;
  UblkService ublk(ublk_options);
  DiskServiceOptions disk_options = DiskOptions(config);
  disk_options.local_export = &ublk;
  Result<std::unique_ptr<DiskService>> disks = DiskService::Open(disk_options);
  if (!disks.ok()) return fail("disk service", disks.status());
  Result<std::unique_ptr<RestoreService>> restore = RestoreService::Open(RestoreOptions(config), *disks.value());
  if (!restore.ok()) return fail("restore point service", restore.status());
  Result<std::unique_ptr<AccessGrants>> grants =
      AccessGrants::Open(AccessOptions(config, nbd_listeners), *restore.value());
  if (!grants.ok()) return fail("access grants", grants.status());
  GrantSharer sharer(*grants.value());
  restore.value()->set_point_sharer(&sharer);
  CompositeResolver exports(*disks.value(), restore.value()->exports(), grants.value()->exports());
  GrantsOnlyResolver grants_only(grants.value()->exports());
  unsigned threads = config.io_threads ? config.io_threads : UsableCpus();
  Result<std::unique_ptr<ReactorPool>> pool = ReactorPool::Create(threads, config.io_queue_depth);
  if (!pool.ok()) return fail("reactor pool", pool.status());
  Result<std::unique_ptr<NbdServer>> nbd = NbdServer::Create(exports, *pool.value(), NbdServerOptions{});
  if (!nbd.ok()) return fail("NBD server", nbd.status());
  ControlServerOptions control_options;
  control_options.version = options.version;
  control_options.access_grants = grants.value().get();
  Result<std::unique_ptr<ControlServer>> control = ControlServer::Create(*disks.value(), *restore.value(), control_options);
  if (!control.ok()) return fail("control server", control.status());
  std::unique_ptr<PeerServer> peers;
  std::string peers_address;
  if (config.peers_listen) {
    Result<std::unique_ptr<PeerServer>> p =
        PeerServer::Create(*restore.value(), PeerServerOptions{config.tls.dir});
    if (!p.ok()) return fail("peer API", p.status());
    Result<std::vector<Listener>> tcp = ListenTcp(*config.peers_listen);
    if (!tcp.ok()) return fail("peer API listener", tcp.status());
    for (auto& l : tcp.value()) {
      if (Status st = p.value()->add_listener(std::move(l.fd)); !st.ok())
        return fail("peer API", st);
    }
    peers = std::move(p).value();
    peers_address = FormatTcpAddress(*config.peers_listen);
  }

  // TLS credentials are loaded here (a bad key file stops the start) and
  // again on SIGHUP (ReloadTls: a bad one then keeps the old).
  nbd::TlsPolicy tcp_tls, unix_tls;
  if (config.tls.configured()) {
    nbd::TlsSettings settings{config.tls.dir, config.tls.psk_file, config.tls.verify_peer};
    auto creds = nbd::TlsCredentials::LoadServer(settings);
    if (!creds.ok()) return fail("TLS", creds.status());
    tcp_tls.credentials = unix_tls.credentials = creds.value();
  }
  if (!nbd::ParseTlsMode(config.nbd_tls, &tcp_tls.mode) ||
      !nbd::ParseTlsMode(config.nbd_unix_tls, &unix_tls.mode)) {
    return fail("TLS", Status::InvalidArgument("bad nbd.tls or nbd.unix_tls"));
  }
  std::vector<std::string> nbd_addresses;
  for (auto& l : nbd_listeners) {
    const nbd::TlsPolicy& tls = IsUnixSocket(l.fd.get()) ? unix_tls : tcp_tls;
    nbd_addresses.push_back(l.address + (l.activated ? " (from systemd)" : "") +
                            (tls.mode == nbd::TlsMode::kOff ? "" : std::string(" (TLS ") +
                                                                       nbd::TlsModeName(tls.mode) + ")"));
    ExportResolver* only =
        config.access.tcp_grants_only && !IsUnixSocket(l.fd.get()) ? &grants_only : nullptr;
    if (only) nbd_addresses.back() += " (access grants only)";
    if (Status st = nbd.value()->add_listener(std::move(l.fd), tls, only); !st.ok()) {
      return fail("NBD listener", st);
    }
  }
  std::string control_address = control_listener->address + (control_listener->activated ? " (from systemd)" : "");
  if (Status st = control.value()->add_listener(std::move(control_listener->fd)); !st.ok()) {
    return fail("control listener", st);
  }
  nbd.value()->start();
  control.value()->start();
  if (peers) {
    peers->start();
    spdlog::info("peer API (HTTPS, mutual TLS) listening on {}", peers_address);
  }

  size_t disk_count = disks.value()->list().size();
  spdlog::info("control API listening on {}", control_address);
  spdlog::info("NBD listening on {}", JoinAddresses(nbd_addresses));
  spdlog::info("ready: {} disk(s), {} reactor thread(s), queue depth {}", disk_count, threads,
               config.io_queue_depth);
  sd_notifyf(0, "READY=1\nSTATUS=Serving %zu disk(s); control %s; NBD %s", disk_count,
             control_address.c_str(), JoinAddresses(nbd_addresses).c_str());

  // --- wait for a signal ---
  sigset_t signals = DaemonSignals();
  int sig = 0;
  for (;;) {
    if (sigwait(&signals, &sig) != 0) continue;
    if (sig == SIGHUP) {
      Reload(options, config);
      ReloadTls(config, *nbd.value());
      if (peers) {
        // The peer listener's certificate, key and CA too (new handshakes).
        Status st = peers->reload_tls();
        if (st.ok()) {
          spdlog::info("SIGHUP: peer API TLS credentials reloaded from {}", config.tls.dir);
        } else {
          spdlog::error("SIGHUP: peer API keeps the TLS credentials in use: {}", st.message());
        }
      }
      if (Status st = ArmFaults(false); !st.ok()) spdlog::error("SIGHUP: {}", st.message());
      continue;
    }
    break;
  }
  spdlog::info("received {}, shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  sd_notify(0, "STOPPING=1\nSTATUS=Shutting down: finishing in-flight I/O");
  StartForcedExitWatcher();

  // New control requests stop first so nothing starts while NBD drains; then
  // restore point jobs stop (an unfinished point becomes Failed, its tracker
  // generations kept) before NBD clients are drained and the disks synced.
  control.value()->stop();
  if (peers) peers->stop();
  restore.value()->shutdown();
  nbd.value()->shutdown();
  // ublk devices stay in the kernel (quiesced: their I/O waits) for the next
  // start to recover, as a kill would leave them; DELETE removes one for good.
  disks.value()->detach_local_exports();
  disks.value()->sync_all();
  control.value().reset();
  nbd.value().reset();  // its connections hold restore point exports
  grants.value()->shutdown();
  grants.value().reset();   // its sweeper asks the restore service about points
  restore.value().reset();  // its point devices post to the reactors
  pool.value().reset();
  disks.value().reset();
  // control_listener / nbd_listeners: socket files are removed as they go out of scope.
  spdlog::info("stopped");
  return 0;
}

}  // namespace rpoint
