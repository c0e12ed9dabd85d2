// ControlServer (control/control_server.h) over a real Unix socket: keep-alive,
// limits, malformed requests, stop().
#include "control/control_server.h"

#include <doctest/doctest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "control/beast.h"
#include "restore/restore_service.h"
#include "services_fixture.h"

using namespace rpoint;
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace fs = std::filesystem;
using Sock = asio::local::stream_protocol::socket;

namespace {

UniqueFd Listen(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd.valid());
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(fd.get(), 16) == 0);
  return fd;
}

struct Fixture : Services {
  std::string sock_path;
  std::unique_ptr<ControlServer> server;
  asio::io_context ioc;

  explicit Fixture(ControlServerOptions o = {}) : Services("/tmp/rpoint-ctl-XXXXXX") {
    sock_path = dir + "/control.sock";
    o.version = "1.2.3";
    auto c = ControlServer::Create(*svc, *restore, o);
    REQUIRE(c.ok());
    server = std::move(c).value();
    REQUIRE(server->add_listener(Listen(sock_path)).ok());
    server->start();
  }
  ~Fixture() {
    server->stop();
    server.reset();
  }
  Sock connect() {
    Sock s(ioc);
    s.connect(asio::local::stream_protocol::endpoint(sock_path));
    return s;
  }
};

http::response<http::string_body> Exchange(Sock& s, http::verb method, const std::string& target,
                                           const std::string& body = "", bool keep_alive = true) {
  http::request<http::string_body> req{method, target, 11};
  req.set(http::field::host, "localhost");
  if (!body.empty()) {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
  }
  req.keep_alive(keep_alive);
  req.prepare_payload();
  http::write(s, req);
  beast::flat_buffer buf;
  http::response<http::string_body> res;
  http::read(s, buf, res);
  return res;
}

// Reads whatever arrives until EOF (for raw, non-HTTP-client tests).
std::string ReadAll(Sock& s) {
  std::string out;
  char buf[4096];
  boost::system::error_code ec;
  for (;;) {
    size_t n = s.read_some(asio::buffer(buf), ec);
    if (ec) break;
    out.append(buf, n);
  }
  return out;
}

}  // namespace

TEST_CASE("keep-alive: several requests on one connection") {
  Fixture f;
  Sock s = f.connect();
  auto r1 = Exchange(s, http::verb::get, "/");
  CHECK(r1.result_int() == 200);
  CHECK(r1[http::field::content_type] == "application/json");
  CHECK(r1[http::field::server] == "rpointd/1.2.3");
  CHECK(r1.body().find("\"1.2.3\"") != std::string::npos);
  auto r2 = Exchange(s, http::verb::put, "/disks/a", R"({"properties": {"sizeBytes": 1048576}})");
  CHECK(r2.result_int() == 201);
  auto r3 = Exchange(s, http::verb::get, "/disks/a?api-version=2026-11-01");
  CHECK(r3.result_int() == 200);
  auto r4 = Exchange(s, http::verb::delete_, "/disks/a");
  CHECK(r4.result_int() == 204);
  CHECK(r4.body().empty());
  auto r5 = Exchange(s, http::verb::get, "/nope", "", false);
  CHECK(r5.result_int() == 404);
  CHECK_FALSE(r5.keep_alive());
}

TEST_CASE("a body over the limit is 413, before it is sent when announced") {
  ControlServerOptions o;
  o.max_body_bytes = 1000;
  Fixture f(o);
  Sock s = f.connect();
  auto r = Exchange(s, http::verb::put, "/disks/a", std::string(2000, ' '));
  CHECK(r.result_int() == 413);
  CHECK(r.body().find("PayloadTooLarge") != std::string::npos);

  // Expect: 100-continue with a small body: 100, then the answer.
  Sock s2 = f.connect();
  std::string body = R"({"properties": {"sizeBytes": 1048576}})";
  std::string head =
      "PUT /disks/b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      "Expect: 100-continue\r\nConnection: close\r\nContent-Length: " +
      std::to_string(body.size()) + "\r\n\r\n";
  asio::write(s2, asio::buffer(head));
  char buf[256];
  size_t n = s2.read_some(asio::buffer(buf));
  CHECK(std::string(buf, n).rfind("HTTP/1.1 100 Continue", 0) == 0);
  asio::write(s2, asio::buffer(body));
  std::string rest = ReadAll(s2);
  CHECK(rest.find("HTTP/1.1 201") != std::string::npos);
}

TEST_CASE("malformed HTTP is answered 400 and the connection closed") {
  Fixture f;
  Sock s = f.connect();
  asio::write(s, asio::buffer(std::string("THIS IS NOT HTTP\r\n\r\n")));
  std::string out = ReadAll(s);
  CHECK(out.rfind("HTTP/1.1 400", 0) == 0);
  CHECK(out.find("BadRequest") != std::string::npos);
}

TEST_CASE("idle connections time out; stop() closes idle connections and the listener") {
  ControlServerOptions o;
  o.idle_timeout_seconds = 1;
  Fixture f(o);
  Sock idle = f.connect();
  auto t0 = std::chrono::steady_clock::now();
  CHECK(ReadAll(idle).empty());  // closed by the server without a word
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));

  Sock s = f.connect();
  CHECK(Exchange(s, http::verb::get, "/health").result_int() == 200);
  f.server->stop();
  CHECK(ReadAll(s).empty());
}

TEST_CASE("at the connection limit an idle connection makes room; busy ones mean 503") {
  ControlServerOptions o;
  o.max_connections = 1;
  Fixture f(o);
  Sock first = f.connect();
  CHECK(Exchange(first, http::verb::get, "/").result_int() == 200);  // now idle
  Sock second = f.connect();
  CHECK(Exchange(second, http::verb::get, "/health").result_int() == 200);
  CHECK(ReadAll(first).empty());  // closed to make room

  // `second` has started a request: it is busy, so a third is refused.
  asio::write(second, asio::buffer(std::string("GET /health HTTP/1.1\r\n")));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Sock third = f.connect();
  std::string out = ReadAll(third);
  CHECK(out.rfind("HTTP/1.1 503", 0) == 0);
}

TEST_CASE("a transfer coding other than chunked is refused, its body never runs") {
  Fixture f;
  Sock s = f.connect();
  asio::write(s, asio::buffer(std::string(
                     "GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
                     "PUT /disks/smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\n\r\n"
                     "{\"properties\": {\"sizeBytes\": 1048576}}")));
  s.shutdown(asio::socket_base::shutdown_send);
  std::string out = ReadAll(s);
  CHECK(out.rfind("HTTP/1.1 400", 0) == 0);
  CHECK(out.find("HTTP/1.1 201") == std::string::npos);
  CHECK_FALSE(f.svc->get("smuggled").ok());
}

TEST_CASE("stop() after a request: its answer arrives, then the connection closes") {
  Fixture f;
  Sock s = f.connect();
  CHECK(Exchange(s, http::verb::get, "/health").result_int() == 200);
  // A request whose body is still on its way when stop() is called is not
  // answered; one complete is.
  Sock busy = f.connect();
  asio::write(busy, asio::buffer(std::string("GET /health HTTP/1.1\r\nHost: x\r\n\r\n")));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  f.server->stop();
  std::string out = ReadAll(busy);
  CHECK(out.rfind("HTTP/1.1 200", 0) == 0);
  CHECK(ReadAll(s).empty());
}

TEST_CASE("add_listener refuses what is not a listening Unix stream socket") {
  Fixture f;
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  ::close(sv[1]);
  auto c = ControlServer::Create(*f.svc, *f.restore, {});
  REQUIRE(c.ok());
  CHECK_FALSE(c.value()->add_listener(UniqueFd(sv[0])).ok());
}
