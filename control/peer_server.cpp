#include "control/peer_server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#pragma GCC diagnostic pop

#include "common/handshake_slots.h"
#include "control/http_types.h"
#include "control/peer_handlers.h"
#include "control/router.h"

namespace rpoint {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

std::string PeerName(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  try {
    asio::ip::tcp::endpoint ep;
    ep.resize(len);
    std::memcpy(ep.data(), &ss, len);
    return ep.address().to_string() + ":" + std::to_string(ep.port());
  } catch (...) {
    return "?";
  }
}

class PeerServerImpl final : public PeerServer {
 public:
  PeerServerImpl(RestoreService& restore, PeerServerOptions options)
      : options_(std::move(options)), slots_(options_.max_connections) {
    AddPeerRoutes(router_, restore);
  }
  ~PeerServerImpl() override { stop(); }

  Status init() { return reload_tls(); }

  // A new context from tls.dir; the one in use stays on any error.
  Status reload_tls() override {
    auto ctx = std::make_shared<ssl::context>(ssl::context::tls_server);
    boost::system::error_code ec;
    const std::string& d = options_.tls_dir;
    ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                         ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1,
                     ec);
    ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
    if (!ec) ctx->load_verify_file(d + "/ca-cert.pem", ec);
    if (ec)
      return Status::InvalidArgument("peers.listen: tls.dir " + d +
                                     ": ca-cert.pem: " + ec.message());
    ctx->use_certificate_chain_file(d + "/server-cert.pem", ec);
    if (!ec) ctx->use_private_key_file(d + "/server-key.pem", ssl::context::pem, ec);
    if (ec) {
      return Status::InvalidArgument("peers.listen: tls.dir " + d +
                                     ": server-cert.pem/server-key.pem: " + ec.message());
    }
    std::lock_guard<std::mutex> lock(mu_);
    ctx_ = std::move(ctx);
    return Status::Ok();
  }

  Status add_listener(UniqueFd fd) override {
    listeners_.push_back(std::move(fd));
    return Status::Ok();
  }

  void start() override {
    accept_thread_ = std::thread([this] { accept_loop(); });
  }

  void stop() override {
    if (stopping_.exchange(true)) return;
    if (accept_thread_.joinable()) accept_thread_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& c : conns_) ::shutdown(c.fd, SHUT_RDWR);
    }
    std::list<Conn> conns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns.swap(conns_);
    }
    for (auto& c : conns) c.thread.join();
  }

 private:
  // A connection's slot (common/handshake_slots.h) says what the acceptor
  // may do to it while it is in its TLS handshake: shut its socket down
  // (evicted at the cap, or past its deadline). Once the handshake is over
  // (end_handshake) the socket is the serving thread's alone. The slot's
  // label is the PeerName at accept (a socket shut down may have none).
  struct Conn {
    int fd = -1;
    std::thread thread;
    std::shared_ptr<HandshakeSlots::Slot> slot;
  };

  // Handshakes past their deadline (io_timeout_seconds) are cut.
  void expire_handshakes() {
    auto cutoff =
        std::chrono::steady_clock::now() - std::chrono::seconds(options_.io_timeout_seconds);
    // Logged before the close: a client that sees it finds the reason in the
    // log (a warning is flushed as it is written).
    slots_.expire(cutoff, [&](const std::string& who) {
      spdlog::warn("peer API: {} did not finish its TLS handshake in {} s; closed", who,
                   options_.io_timeout_seconds);
    });
  }

  void reap_locked() {
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (it->slot->exited()) {
        it->thread.join();
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void accept_loop() {
    std::vector<pollfd> fds;
    for (auto& l : listeners_) fds.push_back({l.get(), POLLIN, 0});
    while (!stopping_.load()) {
      int n = ::poll(fds.data(), fds.size(), 200);
      expire_handshakes();
      if (n <= 0) continue;
      for (auto& p : fds) {
        if (!(p.revents & POLLIN)) continue;
        int fd = ::accept4(p.fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) continue;
        std::lock_guard<std::mutex> lock(mu_);
        reap_locked();
        // At the cap, the oldest connection still in its TLS handshake makes
        // room (silent clients cannot lock peers out); authenticated ones stay.
        // Evicted ones still exiting may take up to the cap again.
        const std::string name = PeerName(fd);
        HandshakeSlots::Admission a = slots_.admit(fd, name, [&](const std::string& evicted) {
          spdlog::warn(
              "peer API: {} connections open; closed {}, still in its TLS handshake, for {}",
              options_.max_connections, evicted, name);
        });
        if (!a.slot) {
          spdlog::warn("peer API: {} connections open; refusing {}", a.threads, name);
          ::close(fd);
          continue;
        }
        // Asio's blocking calls poll without a timeout (SO_RCVTIMEO would
        // not help): keepalive probes and TCP_USER_TIMEOUT make the kernel
        // fail a connection whose link is gone, which frees its thread.
        int on = 1, idle = static_cast<int>(options_.io_timeout_seconds), intvl = 5, cnt = 3;
        unsigned user_timeout_ms = options_.io_timeout_seconds * 1000;
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof user_timeout_ms);
        std::shared_ptr<HandshakeSlots::Slot> slot = a.slot;
        conns_.push_back({fd, std::thread([this, fd, slot] {
                            serve(fd, *slot);
                            slots_.exit(*slot);
                          }),
                          std::move(a.slot)});
      }
    }
  }

  void serve(int fd, HandshakeSlots::Slot& slot) {
    const std::string who = PeerName(fd);
    asio::io_context io;
    beast::error_code ec;
    std::shared_ptr<ssl::context> ctx;  // this connection's, whatever a reload does meanwhile
    {
      std::lock_guard<std::mutex> lock(mu_);
      ctx = ctx_;
    }
    ssl::stream<tcp::socket> stream(io, *ctx);
    stream.lowest_layer().assign(fd >= 0 && PeerIsV6(fd) ? tcp::v6() : tcp::v4(), fd, ec);
    if (ec) {
      slots_.end_handshake(slot);  // before the close: the number may be reused
      ::close(fd);
      return;
    }
    stream.handshake(ssl::stream_base::server, ec);
    // From here the acceptor leaves the socket alone (it is closed below or
    // served). One evicted just as its handshake succeeded is dead: drop it.
    if (slots_.end_handshake(slot) && !ec) return;
    if (ec) {
      // No certificate, another CA's, a plaintext client: nothing is served.
      spdlog::warn("peer API: refused {}: TLS handshake failed: {}", who, ec.message());
      return;
    }
    beast::flat_buffer buf;
    while (!stopping_.load()) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(options_.max_body_bytes);
      http::read(stream, buf, parser, ec);
      if (ec) break;
      auto& req = parser.get();
      HttpRequest r;
      r.method = std::string(req.method_string());
      r.target = std::string(req.target());
      r.content_type = std::string(req[http::field::content_type]);
      r.body = std::move(req.body());
      HttpResponse resp = router_.dispatch(r);
      http::response<http::string_body> res{static_cast<http::status>(resp.status), 11};
      res.set(http::field::server, "rpointd-peer");
      for (const auto& [k, v] : resp.headers) res.set(k, v);
      if (!resp.body.empty()) res.set(http::field::content_type, resp.content_type);
      res.body() = std::move(resp.body);
      res.keep_alive(req.keep_alive());
      res.prepare_payload();
      http::write(stream, res, ec);
      if (ec || !res.keep_alive()) break;
    }
    stream.shutdown(ec);
  }

  static bool PeerIsV6(int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    return getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0 && ss.ss_family == AF_INET6;
  }

  PeerServerOptions options_;
  Router router_;
  std::shared_ptr<ssl::context> ctx_;  // guarded by mu_: new handshakes take the current one
  std::vector<UniqueFd> listeners_;
  std::thread accept_thread_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::list<Conn> conns_;  // mu_; accept order
  HandshakeSlots slots_;
};

}  // namespace

Result<std::unique_ptr<PeerServer>> PeerServer::Create(RestoreService& restore,
                                                       PeerServerOptions options) {
  auto s = std::make_unique<PeerServerImpl>(restore, std::move(options));
  Status st = s->init();
  if (!st.ok()) return st;
  return std::unique_ptr<PeerServer>(std::move(s));
}

}  // namespace rpoint
