// HttpConnection: one control-API connection served asynchronously on the
// server's I/O loop (Boost.Beast on Asio). It reads HTTP/1.1 requests, runs
// each through the Router on a worker pool (handlers may block on SQLite or
// fsync; the loop never does), and writes the answers, with keep-alive, a
// body size limit (413 before the body is sent), "Expect: 100-continue",
// an idle timeout (no request started) and a request timeout (a started
// request must arrive, and its answer drain, in time), and a lingering close
// after errors so the client reads the answer.
//
// Request framing is strict (RFC 9112), so that no byte a client sends is
// ever taken for the start of another request it did not mean:
//   Transfer-Encoding other than exactly "chunked"  -> 501 (not final: 400)
//   Transfer-Encoding together with Content-Length  -> 400
//   differing Content-Length values                 -> 400
//   obsolete line folding (obs-fold) in a header    -> 400
// and each of these closes the connection.
//
// An idle connection costs a socket, a timer and a small buffer, not a
// thread.
//
// Thread-safety: every member runs on the I/O loop's one thread (the
// handler's work is posted to the pool and its result posted back).
#pragma once

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>

#include "control/beast.h"
#include "control/router.h"

namespace rpoint {

struct HttpConnectionLimits {
  size_t max_body_bytes = 1u << 20;
  size_t max_header_bytes = 16 * 1024;
  unsigned idle_timeout_seconds = 60;
  unsigned request_timeout_seconds = 30;
  std::string server_header;  // "rpointd/0.1.0"
};

class HttpConnection;

// What the connections of one server share; implemented by the server.
class HttpConnectionOwner {
 public:
  virtual ~HttpConnectionOwner() = default;
  // The connection has closed its socket and will do nothing more.
  virtual void connection_closed(HttpConnection* c) = 0;
  // True once the server stops: answers carry "Connection: close".
  virtual bool stopping() const = 0;
};

struct HttpServeContext {
  boost::asio::io_context& io;        // the I/O loop (one thread runs it)
  boost::asio::thread_pool& workers;  // Router::dispatch runs here
  const Router& router;
  const HttpConnectionLimits& limits;
  HttpConnectionOwner& owner;
};

class HttpConnection : public std::enable_shared_from_this<HttpConnection> {
 public:
  using Socket = boost::asio::local::stream_protocol::socket;

  HttpConnection(const HttpServeContext& ctx, Socket socket);

  // Serves requests until the client closes, a timeout passes or the server stops.
  void start();
  // Answers `response` at once (e.g. 503: too many connections) and closes.
  void refuse(const HttpResponse& response);
  // Waiting for a request and nothing of it read: can be closed without loss.
  bool idle() const { return state_ == State::kIdle; }
  // The server stops: close now unless a request is being answered, in which
  // case close once the answer is written.
  void shutdown();
  // Closes the socket now; pending operations end. Idempotent.
  void close();

 private:
  enum class State { kIdle, kReading, kHandling, kWriting, kLingering, kClosed };

  void read_request();
  void read_header_bytes();
  void on_header_complete(size_t header_end);
  void read_body();
  void dispatch();
  void write_response(const HttpResponse& out, unsigned version, bool keep_alive, bool linger);
  void fail_request(const boost::system::error_code& ec);
  void answer_error(const HttpResponse& err);
  void linger();
  void arm_timer(unsigned seconds);
  void on_timeout();

  HttpServeContext ctx_;
  Socket socket_;
  boost::asio::steady_timer timer_;
  unsigned timer_generation_ = 0;
  bool timed_out_ = false;
  State state_ = State::kIdle;
  boost::beast::flat_buffer buffer_;
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>> parser_;
  size_t lingered_ = 0;
};

}  // namespace rpoint
