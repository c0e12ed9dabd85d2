// NbdServer implementation: listeners, one acceptor thread, a short-lived
// thread per handshake, and Connections handed to the reactors.
#include "nbd/server.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <list>
#include <mutex>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "common/accept_guard.h"
#include "common/handshake_slots.h"
#include "nbd/connection.h"
#include "nbd/handshake.h"

namespace rpoint {
namespace {

using nbd::Connection;

// Handshakes in progress at once. A new connection at the cap evicts the
// oldest one still negotiating (silent clients cannot lock real ones out);
// evicted threads still exiting count up to kMaxHandshakes more, beyond which
// new connections are closed at accept (common/handshake_slots.h).
constexpr size_t kMaxHandshakes = 512;
// The acceptor also looks for connections of retired devices this often.
constexpr int kHousekeepingMs = 200;

class NbdServerImpl final : public NbdServer {
 public:
  NbdServerImpl(ExportResolver& resolver, ReactorPool& pool, NbdServerOptions options,
                UniqueFd stop_fd)
      : resolver_(resolver), pool_(pool), opts_(options), stop_fd_(std::move(stop_fd)) {}
  ~NbdServerImpl() override { shutdown(); }

  Status add_listener(UniqueFd fd, nbd::TlsPolicy tls, ExportResolver* resolver) override;
  void set_tls_credentials(std::shared_ptr<const nbd::TlsCredentials> creds) override;
  void start() override;
  void shutdown() override;
  void serve_one(UniqueFd in_fd, UniqueFd out_fd) override;
  size_t connection_count() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return conns_.size() + handshaking_;
  }

 private:
  // A handshake's thread and its slot in slots_: while it negotiates, an
  // eviction shuts its socket down, which wakes the handshake's poll.
  struct HandshakeThread {
    std::thread thread;
    std::shared_ptr<HandshakeSlots::Slot> slot;
  };

  void accept_loop();
  struct ListenerEntry {
    UniqueFd fd;
    nbd::TlsPolicy tls;        // credentials guarded by tls_mu_ (set_tls_credentials)
    ExportResolver* resolver;  // never null: the listener's or the server's own
  };
  void accept_one(const ListenerEntry& l);
  void run_handshake(UniqueFd fd, nbd::TlsPolicy tls, ExportResolver& resolver,
                     HandshakeSlots::Slot* self);
  // Negotiates on in/out; on success returns a registered connection on `reactor`.
  // `self` (null for serve_one) is unhooked from eviction once negotiation ends.
  std::shared_ptr<Connection> negotiate(UniqueFd in, UniqueFd out, Reactor& reactor,
                                        ExportResolver& resolver, Connection::ClosedFn on_closed,
                                        const nbd::TlsPolicy& tls,
                                        HandshakeSlots::Slot* self = nullptr);
  void on_closed(Connection* c);
  void check_retired();
  bool wait_empty(std::chrono::milliseconds timeout);

  ExportResolver& resolver_;
  ReactorPool& pool_;
  NbdServerOptions opts_;
  UniqueFd stop_fd_;  // eventfd, readable once shutdown begins (wakes every poll)
  std::vector<ListenerEntry> listeners_;  // fixed once start() runs
  std::thread acceptor_;
  AcceptGuard accept_guard_{"nbd"};        // acceptor thread
  std::list<HandshakeThread> handshakes_;  // acceptor thread, then shutdown after joining it
  HandshakeSlots slots_{kMaxHandshakes};

  std::mutex tls_mu_;  // listeners_[i].tls.credentials
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool shut_down_ = false;
  size_t handshaking_ = 0;
  std::unordered_map<Connection*, std::shared_ptr<Connection>> conns_;
};

void NbdServerImpl::set_tls_credentials(std::shared_ptr<const nbd::TlsCredentials> creds) {
  std::lock_guard<std::mutex> lock(tls_mu_);
  for (auto& l : listeners_) {
    if (l.tls.credentials) l.tls.credentials = creds;
  }
}

Status NbdServerImpl::add_listener(UniqueFd fd, nbd::TlsPolicy tls, ExportResolver* resolver) {
  if (!fd) return Status::InvalidArgument("invalid listening socket");
  if (tls.mode != nbd::TlsMode::kOff && !tls.credentials) {
    return Status::InvalidArgument("TLS mode '" + std::string(nbd::TlsModeName(tls.mode)) +
                                   "' needs credentials");
  }
  if (acceptor_.joinable()) return Status::Internal("add_listener after start");
  // poll() says when to accept; a non-blocking listener never hangs on a
  // connection that vanished in between.
  int fl = fcntl(fd.get(), F_GETFL);
  if (fl < 0 || fcntl(fd.get(), F_SETFL, fl | O_NONBLOCK) < 0) {
    return Status::FromErrno(errno, "fcntl O_NONBLOCK on listener");
  }
  listeners_.push_back({std::move(fd), std::move(tls), resolver ? resolver : &resolver_});
  return Status::Ok();
}

void NbdServerImpl::start() {
  if (acceptor_.joinable()) return;
  acceptor_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "nbd-accept");
    accept_loop();
  });
}

void NbdServerImpl::accept_loop() {
  std::vector<pollfd> pfds;
  auto last_check = std::chrono::steady_clock::now();
  for (;;) {
    pfds.clear();
    pfds.push_back({stop_fd_.get(), POLLIN, 0});
    for (const ListenerEntry& l : listeners_) pfds.push_back({l.fd.get(), POLLIN, 0});
    int n = ::poll(pfds.data(), pfds.size(), kHousekeepingMs);
    if (n < 0 && errno != EINTR) {
      spdlog::error("nbd: poll on listeners: {}", std::strerror(errno));
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (pfds[0].revents & POLLIN) break;
    if (n > 0) {
      for (size_t i = 1; i < pfds.size(); ++i) {
        if (pfds[i].revents & POLLIN) accept_one(listeners_[i - 1]);
      }
    }
    // Reap finished handshake threads.
    for (auto it = handshakes_.begin(); it != handshakes_.end();) {
      if (it->slot->exited()) {
        it->thread.join();
        it = handshakes_.erase(it);
      } else {
        ++it;
      }
    }
    auto now = std::chrono::steady_clock::now();
    if (now - last_check >= std::chrono::milliseconds(kHousekeepingMs)) {
      last_check = now;
      check_retired();
    }
  }
}

void NbdServerImpl::accept_one(const ListenerEntry& l) {
  const int listen_fd = l.fd.get();
  ExportResolver& resolver = *l.resolver;
  // Accept everything pending: a burst of clients (multi-conn) arrives together.
  for (int i = 0; i < 64; ++i) {
    UniqueFd fd(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd) {
      if (AcceptGuard::IsExhaustion(errno)) {
        // Out of descriptors: refuse one waiting client, back off, retry.
        std::this_thread::sleep_for(accept_guard_.on_exhausted(listen_fd, errno));
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                 errno != ECONNABORTED) {
        spdlog::error("nbd: accept: {}", std::strerror(errno));
      }
      return;
    }
    accept_guard_.on_accepted();
    int domain = 0;
    socklen_t len = sizeof(domain);
    if (getsockopt(fd.get(), SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
        (domain == AF_INET || domain == AF_INET6)) {
      int one = 1;
      // Replies are small and latency-bound: never wait for Nagle.
      setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
    }
    // The eviction is logged before its close (as the peer API does).
    HandshakeSlots::Admission a = slots_.admit(fd.get(), "", [](const std::string&) {
      spdlog::warn("nbd: {} handshakes in progress; evicted the oldest for a new client",
                   kMaxHandshakes);
    });
    if (!a.slot) {
      if (a.threads >= 2 * kMaxHandshakes) {
        spdlog::warn("nbd: too many handshakes in progress; dropping a new client");
      }
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++handshaking_;
    }
    nbd::TlsPolicy tls;  // a copy: the handshake keeps the credentials it began with
    {
      std::lock_guard<std::mutex> lock(tls_mu_);
      tls = l.tls;
    }
    handshakes_.emplace_back();
    HandshakeThread* h = &handshakes_.back();
    h->slot = std::move(a.slot);
    HandshakeSlots::Slot* slot = h->slot.get();
    int raw = fd.release();
    try {
      h->thread = std::thread([this, raw, tls = std::move(tls), slot, &resolver] {
        pthread_setname_np(pthread_self(), "nbd-handshake");
        run_handshake(UniqueFd(raw), tls, resolver, slot);
      });
    } catch (const std::system_error& e) {
      // Out of threads: refuse this client rather than take the daemon down.
      spdlog::warn("nbd: cannot start a handshake thread: {}", e.what());
      slots_.exit(*slot);  // before the close: never shut down by number again
      ::close(raw);
      handshakes_.pop_back();
      {
        std::lock_guard<std::mutex> lock(mu_);
        --handshaking_;
      }
      cv_.notify_all();
      return;
    }
  }
}

void NbdServerImpl::run_handshake(UniqueFd fd, nbd::TlsPolicy tls, ExportResolver& resolver,
                                  HandshakeSlots::Slot* self) {
  Reactor& reactor = pool_.next();
  std::shared_ptr<Connection> c = negotiate(
      std::move(fd), UniqueFd(), reactor, resolver, [this](Connection* conn) { on_closed(conn); },
      tls, self);
  if (c) reactor.post([c] { c->start(); });
  {
    std::lock_guard<std::mutex> lock(mu_);
    --handshaking_;
  }
  cv_.notify_all();
  slots_.exit(*self);
}

std::shared_ptr<Connection> NbdServerImpl::negotiate(UniqueFd in, UniqueFd out, Reactor& reactor,
                                                     ExportResolver& resolver,
                                                     Connection::ClosedFn on_closed,
                                                     const nbd::TlsPolicy& tls,
                                                     HandshakeSlots::Slot* self) {
  auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(opts_.handshake_timeout_seconds);
  int in_fd = in.get();
  int out_fd = out.valid() ? out.get() : in_fd;
  nbd::HandshakeChannel ch(in_fd, out_fd, stop_fd_.get(), deadline);
  auto r = nbd::Negotiate(ch, resolver, opts_.max_payload, tls);
  if (self) {
    // From here the socket is closed or established: never evicted. One shut
    // down just as Negotiate succeeded is dead: drop it.
    if (slots_.end_handshake(*self) && r.ok()) return nullptr;
  }
  if (!r.ok()) {
    // A refused TLS client (wrong certificate or key) is worth an operator's eye.
    if (r.status().code() == Code::kPermissionDenied) {
      spdlog::info("nbd: client refused: {}", r.status().message());
    } else {
      spdlog::debug("nbd: handshake ended: {}", r.status().ToString());
    }
    return nullptr;
  }
  nbd::ConnectionLimits limits;
  limits.buffer_budget = std::max<size_t>(
      limits.buffer_budget, 2 * size_t{std::max(opts_.max_payload, nbd::kUnnegotiatedMaxRequest)});
  auto c = std::make_shared<Connection>(reactor, std::move(in), std::move(out),
                                        std::move(r).value(), limits, std::move(on_closed));
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return nullptr;  // shutdown raced with the handshake: never started
  conns_.emplace(c.get(), c);
  return c;
}

void NbdServerImpl::on_closed(Connection* c) {
  std::shared_ptr<Connection> doomed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = conns_.find(c);
    if (it != conns_.end()) {
      doomed = std::move(it->second);
      conns_.erase(it);
    }
  }
  cv_.notify_all();
  // `doomed` (and with it the device Use) goes here, outside the lock, unless a
  // posted message still holds the connection.
}

void NbdServerImpl::check_retired() {
  std::vector<std::shared_ptr<Connection>> retired;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [raw, c] : conns_) {
      if (c->device()->retired() && !c->closed() && c->claim_shutdown()) retired.push_back(c);
    }
  }
  for (auto& c : retired) {
    spdlog::info("nbd: export '{}' was retired: disconnecting its client", c->export_name());
    c->reactor().post([c] { c->begin_shutdown(); });
  }
}

bool NbdServerImpl::wait_empty(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return conns_.empty() && handshaking_ == 0; });
}

void NbdServerImpl::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    stopping_ = true;
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_.get(), &one, sizeof(one));
  if (acceptor_.joinable()) acceptor_.join();
  // Handshake threads see the stop eventfd and give up at once.
  for (auto& h : handshakes_) {
    if (h.thread.joinable()) h.thread.join();
  }
  handshakes_.clear();
  listeners_.clear();

  std::vector<std::shared_ptr<Connection>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [raw, c] : conns_) all.push_back(c);
  }
  for (auto& c : all) c->reactor().post([c] { c->begin_shutdown(); });
  all.clear();
  if (wait_empty(std::chrono::milliseconds(opts_.shutdown_grace_ms))) return;

  // Clients that do not read their replies would hold us forever: cut them.
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [raw, c] : conns_) all.push_back(c);
  }
  spdlog::warn("nbd: {} client(s) still busy after {} ms; closing them", all.size(),
               opts_.shutdown_grace_ms);
  for (auto& c : all) c->reactor().post([c] { c->force_close(); });
  all.clear();
  if (!wait_empty(std::chrono::seconds(5))) {
    spdlog::error("nbd: some connections did not close; giving up on them");
  }
}

void NbdServerImpl::serve_one(UniqueFd in_fd, UniqueFd out_fd) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    ++handshaking_;
  }
  auto reactor = Reactor::Create("nbd-serve-one", 256);
  std::shared_ptr<Connection> c;
  if (!reactor.ok()) {
    spdlog::error("nbd: serve_one: {}", reactor.status().ToString());
  } else {
    Reactor* r = reactor->get();
    c = negotiate(
        std::move(in_fd), std::move(out_fd), *r, resolver_,
        [this, r](Connection* conn) {
          on_closed(conn);
          r->stop();
        },
        nbd::TlsPolicy{});
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    --handshaking_;
  }
  cv_.notify_all();
  if (!c) return;
  Reactor* r = reactor->get();
  r->post([c] { c->start(); });
  c.reset();
  r->run();
}

}  // namespace

Result<std::unique_ptr<NbdServer>> NbdServer::Create(ExportResolver& resolver, ReactorPool& pool,
                                                     NbdServerOptions options) {
  if (options.max_payload < 4096) return Status::InvalidArgument("max_payload must be >= 4096");
  if (options.handshake_timeout_seconds == 0) {
    return Status::InvalidArgument("handshake_timeout_seconds must be > 0");
  }
  UniqueFd stop_fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_fd) return Status::FromErrno(errno, "eventfd");
  return std::unique_ptr<NbdServer>(
      std::make_unique<NbdServerImpl>(resolver, pool, options, std::move(stop_fd)));
}

}  // namespace rpoint
