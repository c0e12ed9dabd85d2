#include "restore/peer_client.h"

#include <chrono>
#include <filesystem>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#pragma GCC diagnostic pop

namespace rpoint {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

class PeerClient final : public PeerLink {
 public:
  PeerClient(std::string dir, unsigned timeout_ms)
      : dir_(std::move(dir)), timeout_ms_(timeout_ms) {}

  Status init() {
    boost::system::error_code ec;
    ctx_.set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
    if (!ec) ctx_.load_verify_file(dir_ + "/ca-cert.pem", ec);
    if (ec) return Status::InvalidArgument("tls.dir " + dir_ + ": ca-cert.pem: " + ec.message());
    ctx_.use_certificate_chain_file(dir_ + "/client-cert.pem", ec);
    if (!ec) ctx_.use_private_key_file(dir_ + "/client-key.pem", ssl::context::pem, ec);
    if (ec) {
      return Status::InvalidArgument("tls.dir " + dir_ +
                                     ": client-cert.pem/client-key.pem (what this host presents "
                                     "to peers): " +
                                     ec.message());
    }
    return Status::Ok();
  }

  Result<nlohmann::json> call(const std::string& peer, const std::string& method,
                              const std::string& path, const nlohmann::json& body) override {
    std::string host, port;
    size_t colon = peer.rfind(':');
    if (colon == std::string::npos)
      return Status::InvalidArgument("peer '" + peer + "' is not host:port");
    host = peer.substr(0, colon);
    port = peer.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
    const std::string what = method + " https://" + peer + path;
    try {
      asio::io_context io;
      beast::ssl_stream<beast::tcp_stream> stream(io, ctx_);
      auto deadline = std::chrono::milliseconds(timeout_ms_);
      tcp::resolver resolver(io);
      auto endpoints = resolver.resolve(host, port);
      stream.next_layer().expires_after(deadline);
      // Async steps run by io.run(): only they honour tcp_stream's expiry.
      beast::error_code ec;
      auto step = [&](auto&& start) {
        ec = {};
        bool done = false;
        start([&](beast::error_code e, auto&&...) {
          ec = e;
          done = true;
        });
        io.restart();
        io.run();
        if (!done) ec = asio::error::timed_out;
      };
      step([&](auto h) { stream.next_layer().async_connect(endpoints, h); });
      if (ec) return Status::IoError(what + ": connect: " + ec.message());
      stream.set_verify_callback(ssl::host_name_verification(host));
      stream.next_layer().expires_after(deadline);
      step([&](auto h) { stream.async_handshake(ssl::stream_base::client, h); });
      // A connection that ends mid-handshake (a peer stopping or starting,
      // a cut) is a transport failure, retried; only a TLS error proper (a
      // certificate refused on either side) is PermissionDenied.
      if (ec && ec.category() != asio::error::get_ssl_category()) {
        return Status::IoError(what + ": TLS handshake: " + ec.message());
      }
      if (ec) {
        return Status::PermissionDenied(what + ": TLS handshake with the peer failed (" +
                                        ec.message() +
                                        "): is its certificate signed by our ca-cert.pem and does "
                                        "it name the host, and does it accept ours?");
      }
      http::request<http::string_body> req{http::string_to_verb(method), path, 11};
      req.set(http::field::host, host);
      req.set(http::field::content_type, "application/json");
      if (!body.is_null()) req.body() = body.dump();
      req.prepare_payload();
      stream.next_layer().expires_after(deadline);
      step([&](auto h) { http::async_write(stream, req, h); });
      if (ec) return Status::IoError(what + ": sending: " + ec.message());
      beast::flat_buffer buf;
      http::response_parser<http::string_body> parser;
      parser.body_limit(64u << 20);
      stream.next_layer().expires_after(deadline);
      step([&](auto h) { http::async_read(stream, buf, parser, h); });
      if (ec) return Status::IoError(what + ": reading the answer: " + ec.message());
      auto& res = parser.get();
      // The connection closes with the stream; a TLS close_notify is not awaited.
      nlohmann::json j;
      if (!res.body().empty()) {
        j = nlohmann::json::parse(res.body(), nullptr, false);
        if (j.is_discarded()) return Status::IoError(what + ": the answer is not JSON");
      }
      int status = res.result_int();
      if (status >= 200 && status < 300) return j;
      std::string code = "HTTP " + std::to_string(status), msg;
      if (j.is_object() && j.contains("error") && j["error"].is_object()) {
        code = j["error"].value("code", code);
        msg = j["error"].value("message", "");
      }
      std::string m = "peer " + peer + ": " + code + (msg.empty() ? "" : ": " + msg);
      switch (status) {
        case 400:
          return Status::InvalidArgument(m);
        case 403:
          return Status::PermissionDenied(m);
        case 404:
          return Status::NotFound(m);
        case 409:
          return Status::Conflict(m);
        default:
          return Status::IoError(m);
      }
    } catch (const std::exception& e) {
      return Status::IoError(what + ": " + e.what());
    }
  }

 private:
  std::string dir_;
  unsigned timeout_ms_;
  ssl::context ctx_{ssl::context::tls_client};
};

}  // namespace

Result<std::unique_ptr<PeerLink>> MakePeerClient(const std::string& tls_dir, unsigned timeout_ms) {
  auto c = std::make_unique<PeerClient>(tls_dir, timeout_ms);
  Status s = c->init();
  if (!s.ok()) return s;
  return std::unique_ptr<PeerLink>(std::move(c));
}

}  // namespace rpoint
