#include "control/control_server.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <list>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/accept_guard.h"
#include "control/access_handlers.h"
#include "control/disk_handlers.h"
#include "control/http_connection.h"
#include "control/operation_handlers.h"
#include "control/restore_point_handlers.h"
#include "control/router.h"
#include "control/service_handlers.h"
#include "control/vm_handlers.h"

namespace rpoint {

namespace {

namespace asio = boost::asio;
using error_code = boost::system::error_code;
using Acceptor = asio::local::stream_protocol::acceptor;

// One I/O thread runs an Asio loop that accepts and serves every connection
// (an idle or slow client costs a socket and a timer, never a thread); the
// handlers, which may block on SQLite commits or fsync, run on a small worker
// pool so one slow request never stalls the loop. All connection state lives
// on the I/O thread.
class ControlServerImpl final : public ControlServer, public HttpConnectionOwner {
 public:
  ControlServerImpl(DiskService& disks, RestoreService& restore, ControlServerOptions options)
      : options_(std::move(options)), workers_(std::max(1u, options_.handler_threads)) {
    limits_.max_body_bytes = options_.max_body_bytes;
    limits_.idle_timeout_seconds = options_.idle_timeout_seconds;
    limits_.request_timeout_seconds = options_.request_timeout_seconds;
    limits_.server_header = "rpointd/" + options_.version;
    AddServiceRoutes(router_, disks, options_.version);
    AddDiskRoutes(router_, disks, restore);
    AddVmRoutes(router_, restore);
    AddRestorePointRoutes(router_, restore);
    AddOperationRoutes(router_, restore, options_.access_grants);
    if (options_.access_grants) AddAccessRoutes(router_, *options_.access_grants);
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
    auto a = std::make_unique<Acceptor>(io_);
    error_code ec;
    a->assign(asio::local::stream_protocol(), fd.get(), ec);
    if (ec) return Status::Internal("control socket: " + ec.message());
    (void)fd.release();  // the acceptor owns it now
    a->non_blocking(true, ec);
    listeners_.push_back(std::move(a));
    return Status::Ok();
  }

  void start() override {
    if (started_ || stopped_) return;
    started_ = true;
    work_.emplace(asio::make_work_guard(io_));
    for (auto& a : listeners_) accept(*a);
    io_thread_ = std::thread([this] { io_.run(); });
  }

  void stop() override {
    if (stopped_.exchange(true)) return;
    if (started_) {
      asio::post(io_, [this] { begin_stop(); });
      io_thread_.join();  // returns once every connection has closed
    }
    workers_.join();
    listeners_.clear();
  }

  // HttpConnectionOwner (I/O thread).
  void connection_closed(HttpConnection* c) override {
    auto it = index_.find(c);
    if (it != index_.end()) {
      conns_.erase(it->second);
      index_.erase(it);
    }
    maybe_finish();
  }
  bool stopping() const override { return stopping_; }

 private:
  void accept(Acceptor& a) {
    a.async_accept([this, &a](const error_code& ec, HttpConnection::Socket s) {
      if (stopping_) return;
      if (ec) {
        if (ec == asio::error::operation_aborted) return;
        if (ec == asio::error::connection_aborted || ec == asio::error::interrupted ||
            ec == asio::error::would_block || ec == asio::error::try_again) {
          accept(a);
          return;
        }
        // Out of descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM) or worse: shed
        // a waiting client, back off instead of spinning on a ready listener,
        // and accept again (common/accept_guard.h).
        std::chrono::milliseconds wait(100);
        if (AcceptGuard::IsExhaustion(ec.value())) {
          wait = accept_guard_.on_exhausted(a.native_handle(), ec.value());
        } else {
          spdlog::error("control: accept: {}", ec.message());
        }
        auto t = std::make_shared<asio::steady_timer>(io_, wait);
        backoff_ = t;
        t->async_wait([this, &a, t](const error_code& e) {
          if (!e && !stopping_) accept(a);
        });
        return;
      }
      accept_guard_.on_accepted();
      admit(std::move(s));
      accept(a);
    });
  }

  void admit(HttpConnection::Socket s) {
    if (conns_.size() >= max_connections_) {
      // Make room by closing the oldest connection that waits for a request
      // (it loses nothing: it may reconnect); refuse only when every one is busy.
      for (auto& c : conns_) {
        if (c->idle()) {
          spdlog::debug("control: {} connections open, closing an idle one", conns_.size());
          c->close();
          break;
        }
      }
    }
    auto conn = std::make_shared<HttpConnection>(
        HttpServeContext{io_, workers_, router_, limits_, *this}, std::move(s));
    bool refuse = conns_.size() >= max_connections_;
    conns_.push_back(conn);
    index_[conn.get()] = std::prev(conns_.end());
    if (refuse) {
      // Counted while it answers (at most a few seconds), so a flood of these
      // is bounded by the request timeout, not by the cap.
      spdlog::warn("control: {} connections open, refusing another", conns_.size() - 1);
      conn->refuse(ErrorResponse(503, "TooManyConnections",
                                 "the control API has too many open connections"));
    } else {
      conn->start();
    }
  }

  void begin_stop() {
    stopping_ = true;
    for (auto& a : listeners_) {
      error_code ec;
      a->close(ec);
    }
    if (auto t = backoff_.lock()) t->cancel();
    // Copy: shutdown() may close, which removes from conns_.
    std::vector<std::shared_ptr<HttpConnection>> all(conns_.begin(), conns_.end());
    for (auto& c : all) c->shutdown();
    maybe_finish();
  }

  void maybe_finish() {
    if (stopping_ && conns_.empty()) work_.reset();  // io_.run() returns when idle
  }

  static unsigned ClampToFdLimit(unsigned wanted) {
    // Each connection holds a descriptor; leave half the limit for disks,
    // exports and the store.
    rlimit rl{};
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
      unsigned half = static_cast<unsigned>(std::min<rlim_t>(rl.rlim_cur / 2, 1u << 30));
      return std::max(1u, std::min(wanted, half));
    }
    return std::max(1u, wanted);
  }

  const ControlServerOptions options_;
  const unsigned max_connections_ = ClampToFdLimit(options_.max_connections);
  HttpConnectionLimits limits_;
  Router router_;
  asio::io_context io_{1};
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_;
  asio::thread_pool workers_;
  std::thread io_thread_;
  std::vector<std::unique_ptr<Acceptor>> listeners_;
  std::weak_ptr<asio::steady_timer> backoff_;
  AcceptGuard accept_guard_{"control"};  // I/O thread
  bool started_ = false;
  std::atomic<bool> stopped_{false};
  bool stopping_ = false;  // I/O thread only
  // I/O thread only: open connections, oldest first.
  std::list<std::shared_ptr<HttpConnection>> conns_;
  std::unordered_map<HttpConnection*, std::list<std::shared_ptr<HttpConnection>>::iterator> index_;
};

}  // namespace

Result<std::unique_ptr<ControlServer>> ControlServer::Create(DiskService& disks,
                                                             RestoreService& restore,
                                                             ControlServerOptions options) {
  if (options.version.empty()) options.version = "unknown";
  return std::unique_ptr<ControlServer>(
      std::make_unique<ControlServerImpl>(disks, restore, std::move(options)));
}

}  // namespace rpoint
