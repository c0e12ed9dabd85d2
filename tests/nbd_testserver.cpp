// nbd_testserver: a minimal host for NbdServer, for tests, fuzzing and benchmarks.
//
// Serves every regular file of --dir as an export named after the file (opened
// on first use; names ending in ".ro" are read-only). Listens on --unix and/or
// --tcp, or serves exactly one client on stdin/stdout with --stdio (fuzzing).
// SIGTERM/SIGINT: NbdServer::shutdown(), then exit 0. SIGUSR1: retire every open
// export (as a forced delete would) so its clients are disconnected.
#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "common/logging.h"
#include "engine/file_disk.h"
#include "nbd/server.h"

using namespace rpoint;

namespace {

class DirResolver : public ExportResolver {
 public:
  DirResolver(std::string dir, bool direct) : dir_(std::move(dir)), direct_(direct) {}

  std::shared_ptr<BlockDevice> find_export(const std::string& name) override {
    if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = open_.find(name);
    if (it != open_.end() && !it->second->retired()) return it->second;
    std::string path = dir_ + "/" + name;
    struct stat st {};
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return nullptr;
    FileDiskOptions o;
    o.name = name;
    o.path = path;
    o.read_only = name.size() > 3 && name.compare(name.size() - 3, 3, ".ro") == 0;
    o.direct = direct_;
    auto d = FileDisk::Open(o);
    if (!d.ok()) {
      spdlog::error("open {}: {}", path, d.status().ToString());
      return nullptr;
    }
    open_[name] = d.value();
    return d.value();
  }

  std::vector<ExportInfo> list_exports() override {
    std::vector<ExportInfo> out;
    DIR* d = opendir(dir_.c_str());
    if (!d) return out;
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;
      std::string path = dir_ + "/" + e->d_name;
      struct stat st {};
      if (stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
        out.push_back({e->d_name, "file " + path});
      }
    }
    closedir(d);
    return out;
  }

  void retire_all() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [name, d] : open_) d->retire();
    open_.clear();
  }

 private:
  std::string dir_;
  bool direct_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<FileDisk>> open_;
};

UniqueFd ListenUnix(const std::string& path) {
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof(a.sun_path)) return UniqueFd();
  std::strcpy(a.sun_path, path.c_str());
  unlink(path.c_str());
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return UniqueFd();
  if (listen(fd.get(), 128) != 0) return UniqueFd();
  return fd;
}

UniqueFd ListenTcp(const std::string& spec) {
  auto colon = spec.rfind(':');
  std::string host = colon == std::string::npos ? "127.0.0.1" : spec.substr(0, colon);
  std::string port = colon == std::string::npos ? spec : spec.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0) return UniqueFd();
  UniqueFd fd(socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  bool ok = bind(fd.get(), res->ai_addr, res->ai_addrlen) == 0 && listen(fd.get(), 128) == 0;
  freeaddrinfo(res);
  return ok ? std::move(fd) : UniqueFd();
}

void Usage() {
  std::fprintf(stderr,
               "usage: nbd_testserver --dir DIR [--unix PATH] [--tcp [HOST:]PORT] [--stdio]\n"
               "       [--threads N] [--direct] [--max-payload BYTES] [--handshake-timeout S]\n"
               "       [--grace-ms MS] [--log-level LEVEL]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, unix_path, tcp, level = "info";
  bool stdio = false, direct = false;
  unsigned threads = 1;
  NbdServerOptions opts;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        Usage();
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--dir") dir = next();
    else if (a == "--unix") unix_path = next();
    else if (a == "--tcp") tcp = next();
    else if (a == "--stdio") stdio = true;
    else if (a == "--direct") direct = true;
    else if (a == "--threads") threads = static_cast<unsigned>(std::stoul(next()));
    else if (a == "--max-payload") opts.max_payload = static_cast<uint32_t>(std::stoul(next()));
    else if (a == "--handshake-timeout") opts.handshake_timeout_seconds = static_cast<unsigned>(std::stoul(next()));
    else if (a == "--grace-ms") opts.shutdown_grace_ms = static_cast<unsigned>(std::stoul(next()));
    else if (a == "--log-level") level = next();
    else {
      Usage();
      return 2;
    }
  }
  if (dir.empty() || (!stdio && unix_path.empty() && tcp.empty())) {
    Usage();
    return 2;
  }
  spdlog::level::level_enum lvl;
  if (!ParseLogLevel(level, &lvl).ok()) lvl = spdlog::level::info;
  InitLogging(lvl);  // to stderr: stdout may carry the protocol (--stdio)

  signal(SIGPIPE, SIG_IGN);
  DirResolver resolver(dir, direct);
  auto pool = ReactorPool::Create(threads, 256);
  if (!pool.ok()) {
    std::fprintf(stderr, "reactors: %s\n", pool.status().ToString().c_str());
    return 1;
  }
  auto server = NbdServer::Create(resolver, **pool, opts);
  if (!server.ok()) {
    std::fprintf(stderr, "server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  if (stdio) {
    (*server)->serve_one(UniqueFd(dup(0)), UniqueFd(dup(1)));
    (*server)->shutdown();
    return 0;
  }

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // before any thread is started

  if (!unix_path.empty()) {
    UniqueFd fd = ListenUnix(unix_path);
    if (!fd || !(*server)->add_listener(std::move(fd)).ok()) {
      std::fprintf(stderr, "cannot listen on %s\n", unix_path.c_str());
      return 1;
    }
  }
  if (!tcp.empty()) {
    UniqueFd fd = ListenTcp(tcp);
    if (!fd || !(*server)->add_listener(std::move(fd)).ok()) {
      std::fprintf(stderr, "cannot listen on %s\n", tcp.c_str());
      return 1;
    }
  }
  (*server)->start();
  spdlog::info("nbd_testserver: serving {}", dir);
  for (;;) {
    int sig = 0;
    sigwait(&set, &sig);
    if (sig == SIGUSR1) {
      spdlog::info("nbd_testserver: retiring every open export");
      resolver.retire_all();
      continue;
    }
    break;
  }
  spdlog::info("nbd_testserver: shutting down");
  (*server)->shutdown();
  (*pool)->stop_and_join();
  return 0;
}
