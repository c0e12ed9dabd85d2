#include "control/control_server.h"

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <fcntl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#include "control/disk_handlers.h"
#include "control/http_connection.h"
#include "control/operation_handlers.h"
#include "control/restore_point_handlers.h"
#include "control/router.h"
#include "control/service_handlers.h"
#include "control/vm_handlers.h"

namespace rpoint {

namespace {

// Accept loops (one thread per listener) hand each connection to a thread of
// its own. Control traffic is a handful of requests; a thread per connection
// keeps every request's blocking work (fsync, SQLite commits) off any shared
// loop, and max_connections bounds the threads.
class ControlServerImpl final : public ControlServer {
 public:
  ControlServerImpl(DiskService& disks, RestoreService& restore, ControlServerOptions options,
                    UniqueFd stop_fd)
      : options_(std::move(options)), stop_fd_(std::move(stop_fd)) {
    limits_.max_body_bytes = options_.max_body_bytes;
    limits_.idle_timeout_seconds = options_.idle_timeout_seconds;
    limits_.request_timeout_seconds = options_.request_timeout_seconds;
    limits_.server_header = "rpointd/" + options_.version;
    AddServiceRoutes(router_, disks, options_.version);
    AddDiskRoutes(router_, disks, restore);
    AddVmRoutes(router_, restore);
    AddRestorePointRoutes(router_, restore);
    AddOperationRoutes(router_, restore);
  }

  ~ControlServerImpl() override { stop(); }

  Status add_listener(UniqueFd fd) override {
    if (started_) return Status::Internal("add_listener after start");
    int domain = 0, type = 0, listening = 0;
    socklen_t len = sizeof(int);
    if (getsockopt(fd.get(), SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) {
      return Status::FromErrno(errno, "control socket");
    }
    len = sizeof(int);
    (void)getsockopt(fd.get(), SOL_SOCKET, SO_TYPE, &type, &len);
    len = sizeof(int);
    (void)getsockopt(fd.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len);
    if (domain != AF_UNIX || type != SOCK_STREAM || !listening) {
      return Status::InvalidArgument("control socket must be a listening Unix stream socket");
    }
    // Non-blocking, so accept() after poll() never blocks if the peer is already gone.
    int fl = fcntl(fd.get(), F_GETFL);
    if (fl < 0 || fcntl(fd.get(), F_SETFL, fl | O_NONBLOCK) != 0) {
      return Status::FromErrno(errno, "control socket: fcntl");
    }
    listeners_.push_back(std::move(fd));
    return Status::Ok();
  }

  void start() override {
    if (started_) return;
    started_ = true;
    for (auto& fd : listeners_) {
      int lfd = fd.get();
      accept_threads_.emplace_back([this, lfd] { accept_loop(lfd); });
    }
  }

  void stop() override {
    if (stopped_.exchange(true)) return;
    stopping_.store(true);
    uint64_t one = 1;
    // Level-triggered: stays readable, so every poll() sees it from now on.
    if (::write(stop_fd_.get(), &one, sizeof one) != sizeof one) {
      spdlog::error("control: cannot signal stop: {}", std::strerror(errno));
    }
    for (auto& t : accept_threads_) t.join();
    accept_threads_.clear();
    listeners_.clear();
    std::list<Conn> conns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns.swap(conns_);
    }
    for (auto& c : conns) c.thread.join();
  }

 private:
  struct Conn {
    std::thread thread;
    std::atomic<bool> done{false};
  };

  void accept_loop(int lfd) {
    for (;;) {
      pollfd fds[2] = {{lfd, POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
      int r = ::poll(fds, 2, -1);
      if (r < 0) {
        if (errno == EINTR) continue;
        spdlog::error("control: poll: {}", std::strerror(errno));
        return;
      }
      if (fds[1].revents & POLLIN) return;
      if (!(fds[0].revents & POLLIN)) continue;
      UniqueFd c(::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) {
        int err = errno;
        if (err == EINTR || err == EAGAIN || err == ECONNABORTED) continue;
        spdlog::error("control: accept: {}", std::strerror(err));
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
          // Out of descriptors: back off instead of spinning on a ready listener.
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
          continue;
        }
        return;
      }
      spawn(std::move(c));
    }
  }

  void spawn(UniqueFd c) {
    std::lock_guard<std::mutex> lock(mu_);
    reap_locked();
    if (conns_.size() >= options_.max_connections) {
      spdlog::warn("control: {} connections open, refusing another", conns_.size());
      WriteHttpResponse(c.get(),
                        ErrorResponse(503, "TooManyConnections",
                                      "the control API has too many open connections"),
                        limits_.server_header);
      return;
    }
    conns_.emplace_back();
    Conn* conn = &conns_.back();
    int fd = c.release();
    conn->thread = std::thread([this, conn, fd] {
      ServeHttpConnection(UniqueFd(fd), router_, limits_, stop_fd_.get(), stopping_);
      conn->done.store(true);
    });
  }

  // Joins connection threads that have finished. Called with mu_ held.
  void reap_locked() {
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (it->done.load()) {
        it->thread.join();
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }

  const ControlServerOptions options_;
  HttpConnectionLimits limits_;
  Router router_;
  UniqueFd stop_fd_;  // eventfd
  std::vector<UniqueFd> listeners_;
  std::vector<std::thread> accept_threads_;
  bool started_ = false;
  std::atomic<bool> stopped_{false};
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::list<Conn> conns_;
};

}  // namespace

Result<std::unique_ptr<ControlServer>> ControlServer::Create(DiskService& disks,
                                                             RestoreService& restore,
                                                             ControlServerOptions options) {
  UniqueFd stop_fd(::eventfd(0, EFD_CLOEXEC));
  if (!stop_fd) return Status::FromErrno(errno, "eventfd");
  if (options.version.empty()) options.version = "unknown";
  return std::unique_ptr<ControlServer>(
      std::make_unique<ControlServerImpl>(disks, restore, std::move(options), std::move(stop_fd)));
}

}  // namespace rpoint
