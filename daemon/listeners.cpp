#include "daemon/listeners.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/logging.h"

namespace rpoint {

SocketFile SocketFile::Adopt(const std::string& path) {
  SocketFile f;
  if (lstat(path.c_str(), &f.st_) == 0) f.path_ = path;
  return f;
}

SocketFile& SocketFile::operator=(SocketFile&& o) noexcept {
  if (this != &o) {
    remove();
    path_ = std::exchange(o.path_, std::string());
    st_ = o.st_;
  }
  return *this;
}

bool SocketFile::SameFile(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino && a.st_ctim.tv_sec == b.st_ctim.tv_sec &&
         a.st_ctim.tv_nsec == b.st_ctim.tv_nsec;
}

void SocketFile::remove() {
  if (path_.empty()) return;
  struct stat st {};
  if (lstat(path_.c_str(), &st) == 0 && SameFile(st, st_)) {
    if (unlink(path_.c_str()) != 0) spdlog::warn("cannot remove {}: {}", path_, std::strerror(errno));
  }
  path_.clear();
}

namespace {

Status MakeUnixAddress(const std::string& path, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr->sun_path) {
    return Status::InvalidArgument("socket path '" + path + "' is empty or longer than " +
                                   std::to_string(sizeof addr->sun_path - 1) + " bytes");
  }
  std::memcpy(addr->sun_path, path.data(), path.size());
  return Status::Ok();
}

// What is at `path`: nothing, a socket nobody answers on (removed), or a
// reason not to touch it.
Status ClearStaleSocket(const std::string& path, const sockaddr_un& addr) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Status::FromErrno(errno, "cannot stat " + path);
  }
  if (!S_ISSOCK(st.st_mode)) {
    return Status::AlreadyExists(path + " exists and is not a socket; not removing it");
  }
  UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!probe) return Status::FromErrno(errno, "socket");
  if (connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0 ||
      errno == EAGAIN || errno == EINPROGRESS) {
    // EAGAIN: a listener whose backlog is full is still a live listener.
    return Status::Conflict("another process (another rpointd?) is listening on " + path +
                            "; refusing to start");
  }
  if (errno != ECONNREFUSED) return Status::FromErrno(errno, "cannot probe existing socket " + path);
  // Nobody listening: left behind by a process that died.
  spdlog::info("removing stale socket {}", path);
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "cannot remove stale socket " + path);
  }
  return Status::Ok();
}

std::string AddressString(const sockaddr* sa, socklen_t len) {
  char host[INET6_ADDRSTRLEN] = "?";
  switch (sa->sa_family) {
    case AF_UNIX: {
      auto* un = reinterpret_cast<const sockaddr_un*>(sa);
      size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
      if (n == 0) return "unix:(unnamed)";
      if (un->sun_path[0] == '\0') return "unix:@" + std::string(un->sun_path + 1, n - 1);
      return "unix:" + std::string(un->sun_path, strnlen(un->sun_path, n));
    }
    case AF_INET: {
      auto* in = reinterpret_cast<const sockaddr_in*>(sa);
      inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
      return "tcp:" + std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
    }
    case AF_INET6: {
      auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
      inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
      return "tcp:[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
    }
  }
  return "family " + std::to_string(sa->sa_family);
}

}  // namespace

std::string DescribeSocket(int fd) {
  sockaddr_storage ss {};
  socklen_t len = sizeof ss;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
    return "fd " + std::to_string(fd) + " (" + std::strerror(errno) + ")";
  }
  return AddressString(reinterpret_cast<sockaddr*>(&ss), len);
}

bool IsUnixSocket(int fd) { return sd_is_socket(fd, AF_UNIX, 0, -1) > 0; }

Result<Listener> ListenUnix(const std::string& path, uint32_t mode) {
  sockaddr_un addr;
  if (Status st = MakeUnixAddress(path, &addr); !st.ok()) return st;
  if (Status st = ClearStaleSocket(path, addr); !st.ok()) return st;

  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Status::FromErrno(errno, "socket");
  // bind() creates the file with 0777 & ~umask: narrow the umask so the file
  // never exists with looser bits than `mode`, then set exactly `mode`.
  mode_t old_umask = umask(~static_cast<mode_t>(mode) & 0777);
  int rc = bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  int bind_errno = errno;
  umask(old_umask);
  if (rc != 0) {
    if (bind_errno == EADDRINUSE) {
      return Status::Conflict(path + " appeared while starting (another rpointd starting?); refusing to start");
    }
    return Status::FromErrno(bind_errno, "cannot bind " + path);
  }
  Listener l;
  if (chmod(path.c_str(), mode) != 0) {
    int e = errno;
    unlink(path.c_str());
    return Status::FromErrno(e, "cannot chmod " + path);
  }
  // After chmod, which changes the change time we identify the file by.
  l.file = SocketFile::Adopt(path);
  if (listen(fd.get(), SOMAXCONN) != 0) return Status::FromErrno(errno, "cannot listen on " + path);
  l.fd = std::move(fd);
  l.address = "unix:" + path;
  return l;
}

Result<std::vector<Listener>> ListenTcp(const TcpAddress& address) {
  const std::string where = FormatTcpAddress(address);
  addrinfo hints {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(address.port);
  int gai = getaddrinfo(address.host.c_str(), port.c_str(), &hints, &res);
  if (gai != 0) {
    return Status::InvalidArgument("nbd.tcp: cannot resolve '" + address.host + "': " + gai_strerror(gai));
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> guard(res, freeaddrinfo);
  size_t count = 0;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) ++count;

  std::vector<Listener> out;
  Status last;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    std::string one = AddressString(ai->ai_addr, ai->ai_addrlen);
    UniqueFd fd(socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd) {
      last = Status::FromErrno(errno, "socket for " + one);
      continue;
    }
    int on = 1;
    // SO_REUSEADDR: a restart must not wait out TIME_WAIT of the last run's connections.
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    // A name with both an IPv4 and an IPv6 address gets one socket each; the
    // IPv6 one must then not also claim the IPv4 port. A lone "::" keeps the
    // system default (dual-stack on Linux).
    if (ai->ai_family == AF_INET6 && count > 1) setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on);
    if (bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      int e = errno;
      last = Status::FromErrno(e, "cannot listen on " + one + (e == EADDRINUSE ? " (port in use)" : ""));
      // An address family the host does not have (IPv6 off) only matters when
      // nothing else works; a port in use always does.
      if (e == EADDRNOTAVAIL || e == EAFNOSUPPORT) continue;
      return last;
    }
    if (listen(fd.get(), SOMAXCONN) != 0) return Status::FromErrno(errno, "cannot listen on " + one);
    Listener l;
    l.fd = std::move(fd);
    l.address = DescribeSocket(l.fd.get());
    out.push_back(std::move(l));
  }
  if (out.empty()) {
    return last.ok() ? Status::InvalidArgument("nbd.tcp: '" + where + "' resolves to no address") : last;
  }
  return out;
}

Result<ActivatedSockets> TakeActivatedSockets() {
  ActivatedSockets out;
  char** names = nullptr;
  // unset_environment=1: these variables describe this process only.
  int n = sd_listen_fds_with_names(1, &names);
  if (n < 0) return Status::FromErrno(-n, "socket activation (LISTEN_FDS)");
  struct NamesFree {
    char** v;
    ~NamesFree() {
      if (!v) return;
      for (char** p = v; *p; ++p) std::free(*p);
      std::free(v);
    }
  } names_free{names};
  out.any = n > 0;
  for (int i = 0; i < n; ++i) {
    int raw = SD_LISTEN_FDS_START + i;
    UniqueFd fd(raw);
    std::string name = names && names[i] ? names[i] : "unknown";
    // Inherited descriptors come without close-on-exec.
    fcntl(raw, F_SETFD, FD_CLOEXEC);
    if (sd_is_socket(raw, AF_UNSPEC, SOCK_STREAM, 1) <= 0) {
      return Status::InvalidArgument("socket activation: fd " + std::to_string(raw) + " named '" + name +
                                     "' is not a listening stream socket");
    }
    Listener l;
    l.address = DescribeSocket(raw);
    l.activated = true;
    l.fd = std::move(fd);
    if (name == "control") {
      if (out.control) return Status::InvalidArgument("socket activation: more than one socket named 'control'");
      out.control = std::move(l);
    } else if (name == "nbd" || name.rfind("nbd-", 0) == 0) {
      out.nbd.push_back(std::move(l));
    } else {
      out.ignored.push_back(name + " (" + l.address + ")");  // closed by l's destructor
    }
  }
  return out;
}

}  // namespace rpoint
