// Listeners: the daemon's listening sockets, made here or taken from systemd.
//
// Unix sockets are created with their permission bits already right (no
// window where a client could connect through looser ones). A socket file left
// behind by a daemon that died is removed; one a live process still answers
// on is not: the daemon refuses to start instead of stealing it. Socket
// activation (LISTEN_FDS) hands over sockets by FileDescriptorName:
// "control" for the control API, "nbd" / "nbd-*" for NBD (Unix or TCP).
//
// Thread-safety: call from the main thread during start-up and shutdown
// (ListenUnix changes the process umask for the duration of bind()).
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "config/config.h"

namespace rpoint {

// A socket file this process created; removed on destruction if it is still
// the same file (a successor daemon may already have replaced it). "The same"
// is device, inode and change time: inode numbers are reused at once, so a
// replacement could otherwise pass for ours.
class SocketFile {
 public:
  SocketFile() = default;
  // Records the identity of the file at `path` as it is now.
  static SocketFile Adopt(const std::string& path);
  SocketFile(SocketFile&& o) noexcept { *this = std::move(o); }
  SocketFile& operator=(SocketFile&& o) noexcept;
  SocketFile(const SocketFile&) = delete;
  SocketFile& operator=(const SocketFile&) = delete;
  ~SocketFile() { remove(); }
  void remove();

 private:
  static bool SameFile(const struct stat& a, const struct stat& b);
  std::string path_;
  struct stat st_ {};
};

struct Listener {
  UniqueFd fd;               // bound and listening
  std::string address;       // "unix:/run/rpointd/nbd.sock", "tcp:127.0.0.1:10809"
  bool activated = false;    // from systemd (never unlinked by us)
  SocketFile file;           // set when we created a Unix socket file
};

// Creates `path` as a listening Unix stream socket with permission bits `mode`.
// Conflict when another process is listening on it; AlreadyExists when the
// path is something other than a socket.
Result<Listener> ListenUnix(const std::string& path, uint32_t mode);
// One listening socket per address `address.host` resolves to.
Result<std::vector<Listener>> ListenTcp(const TcpAddress& address);

struct ActivatedSockets {
  std::optional<Listener> control;
  std::vector<Listener> nbd;  // Unix and TCP alike
  bool any = false;           // LISTEN_FDS was set for us
  std::vector<std::string> ignored;  // fds with names we do not know (closed)
};
// Takes the sockets systemd passed (and unsets LISTEN_FDS & co.). Error when a
// passed fd is not a listening stream socket or "control" is passed twice.
Result<ActivatedSockets> TakeActivatedSockets();

// "unix:/path", "unix:@abstract", "tcp:1.2.3.4:5", "tcp:[::1]:5".
std::string DescribeSocket(int fd);
bool IsUnixSocket(int fd);

}  // namespace rpoint
