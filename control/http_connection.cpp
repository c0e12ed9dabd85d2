#include "control/http_connection.h"

#include "control/beast.h"

#include <poll.h>
#include <spdlog/spdlog.h>

#include <chrono>

namespace rpoint {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Clock = std::chrono::steady_clock;
using error_code = boost::system::error_code;

// A blocking socket whose reads and writes wait with poll(): each gives up at
// a deadline (timeout) or when the server's stop_fd fires, which plain
// blocking sockets cannot do. Satisfies Beast's SyncReadStream/SyncWriteStream.
class TimedStream {
 public:
  TimedStream(asio::local::stream_protocol::socket& sock, int stop_fd)
      : sock_(sock), stop_fd_(stop_fd) {}

  void set_deadline(Clock::time_point t) { deadline_ = t; }
  // Once a request's first byte has arrived, the deadline moves to now + this.
  void on_first_byte(std::chrono::seconds d) { first_byte_timeout_ = d; }
  bool saw_bytes() const { return saw_bytes_; }
  void begin_request() { saw_bytes_ = false; }
  bool timed_out() const { return timed_out_; }

  template <class Buffers>
  size_t read_some(const Buffers& b, error_code& ec) {
    if (!wait(POLLIN, ec)) return 0;
    size_t n = sock_.read_some(b, ec);
    if (n > 0 && !saw_bytes_) {
      saw_bytes_ = true;
      deadline_ = Clock::now() + first_byte_timeout_;
    }
    return n;
  }
  template <class Buffers>
  size_t read_some(const Buffers& b) {
    error_code ec;
    size_t n = read_some(b, ec);
    if (ec) throw boost::system::system_error(ec);
    return n;
  }
  template <class Buffers>
  size_t write_some(const Buffers& b, error_code& ec) {
    if (!wait(POLLOUT, ec)) return 0;
    return sock_.write_some(b, ec);
  }
  template <class Buffers>
  size_t write_some(const Buffers& b) {
    error_code ec;
    size_t n = write_some(b, ec);
    if (ec) throw boost::system::system_error(ec);
    return n;
  }

 private:
  // True when the socket is ready; false with ec set on timeout or stop.
  // Writes ignore stop: an answer already being written is finished.
  bool wait(short events, error_code& ec) {
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now());
      if (left.count() <= 0) {
        timed_out_ = true;
        ec = asio::error::timed_out;
        return false;
      }
      pollfd fds[2] = {{sock_.native_handle(), events, 0}, {stop_fd_, POLLIN, 0}};
      int nfds = events == POLLIN ? 2 : 1;
      int r = ::poll(fds, nfds, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
      if (r < 0) {
        if (errno == EINTR) continue;
        ec = error_code(errno, boost::system::system_category());
        return false;
      }
      if (r == 0) continue;  // the deadline check above ends it
      if (nfds == 2 && (fds[1].revents & POLLIN)) {
        ec = asio::error::operation_aborted;
        return false;
      }
      return true;  // readable, writable, or an error/hangup the read/write reports
    }
  }

  asio::local::stream_protocol::socket& sock_;
  int stop_fd_;
  Clock::time_point deadline_ = Clock::now();
  std::chrono::seconds first_byte_timeout_{30};
  bool saw_bytes_ = false;
  bool timed_out_ = false;
};

http::response<http::string_body> ToBeast(const HttpResponse& r, unsigned version,
                                          const std::string& server_header) {
  http::response<http::string_body> res{static_cast<http::status>(r.status), version};
  res.set(http::field::server, server_header);
  if (!r.content_type.empty() && !r.body.empty()) res.set(http::field::content_type, r.content_type);
  for (const auto& [k, v] : r.headers) res.set(k, v);
  res.body() = r.body;
  res.prepare_payload();
  return res;
}

template <class Stream>
void Write(Stream& stream, http::response<http::string_body>& res) {
  error_code ec;
  http::write(stream, res, ec);
  if (ec && ec != asio::error::broken_pipe && ec != asio::error::connection_reset) {
    spdlog::debug("control: writing response: {}", ec.message());
  }
}

// After answering a request we did not read to the end (413, 400), closing at
// once would make the kernel reset the connection while the client is still
// sending, and it would never read our answer. So: stop sending, then discard
// what still arrives, for a bounded time and amount, before closing.
void LingeringClose(asio::local::stream_protocol::socket& sock, TimedStream& stream) {
  error_code ec;
  sock.shutdown(asio::socket_base::shutdown_send, ec);
  stream.set_deadline(Clock::now() + std::chrono::seconds(2));
  char sink[16384];
  size_t total = 0;
  while (total < (64u << 20)) {
    size_t n = stream.read_some(asio::buffer(sink), ec);
    if (ec || n == 0) break;
    total += n;
  }
}

}  // namespace

void WriteHttpResponse(int fd, const HttpResponse& response, const std::string& server_header) {
  asio::io_context ioc;
  asio::local::stream_protocol::socket sock(ioc);
  error_code ec;
  sock.assign(asio::local::stream_protocol(), ::dup(fd), ec);
  if (ec) return;
  auto res = ToBeast(response, 11, server_header);
  res.keep_alive(false);
  http::write(sock, res, ec);
}

void ServeHttpConnection(UniqueFd fd, const Router& router, const HttpConnectionLimits& limits,
                         int stop_fd, const std::atomic<bool>& stopping) {
  asio::io_context ioc;  // never run: the socket only needs an executor for sync calls
  asio::local::stream_protocol::socket sock(ioc);
  error_code ec;
  sock.assign(asio::local::stream_protocol(), fd.release(), ec);
  if (ec) {
    spdlog::error("control: cannot adopt connection: {}", ec.message());
    return;
  }
  TimedStream stream(sock, stop_fd);
  stream.on_first_byte(std::chrono::seconds(limits.request_timeout_seconds));
  beast::flat_buffer buffer;

  while (!stopping.load()) {
    stream.begin_request();
    stream.set_deadline(Clock::now() + std::chrono::seconds(limits.idle_timeout_seconds));
    if (buffer.size() > 0) {
      stream.set_deadline(Clock::now() + std::chrono::seconds(limits.request_timeout_seconds));
    }
    http::request_parser<http::string_body> parser;
    parser.body_limit(limits.max_body_bytes);
    parser.header_limit(16 * 1024);

    http::read_header(stream, buffer, parser, ec);
    if (!ec && !parser.is_done()) {
      auto& hdr = parser.get();
      auto len = parser.content_length();
      if (len && *len > limits.max_body_bytes) {
        ec = http::error::body_limit;  // answer now, before the client sends it
      } else if (beast::iequals(hdr[http::field::expect], "100-continue")) {
        http::response<http::empty_body> cont{http::status::continue_, hdr.version()};
        http::write(stream, cont, ec);
      }
      if (!ec) http::read(stream, buffer, parser, ec);
    }

    if (ec) {
      HttpResponse err;
      if (ec == http::error::end_of_stream || ec == asio::error::eof ||
          ec == asio::error::connection_reset || ec == asio::error::operation_aborted ||
          (ec == asio::error::timed_out && !stream.saw_bytes())) {
        break;  // closed, stopping, or idle: nothing to answer
      } else if (ec == http::error::body_limit) {
        err = ErrorResponse(413, "PayloadTooLarge",
                            "request body is larger than " +
                                std::to_string(limits.max_body_bytes) + " bytes");
      } else if (ec == http::error::header_limit) {
        err = ErrorResponse(431, "HeadersTooLarge", "request headers are too large");
      } else if (ec == asio::error::timed_out) {
        err = ErrorResponse(408, "RequestTimeout", "request not received in time");
      } else {
        err = ErrorResponse(400, "BadRequest", "malformed HTTP request: " + ec.message());
      }
      // The stream position is unknown after a failed parse: answer and close.
      stream.set_deadline(Clock::now() + std::chrono::seconds(limits.request_timeout_seconds));
      auto res = ToBeast(err, 11, limits.server_header);
      res.keep_alive(false);
      Write(stream, res);
      LingeringClose(sock, stream);
      break;
    }

    auto& req = parser.get();
    HttpRequest hr;
    hr.method = std::string(req.method_string());
    hr.target = std::string(req.target());
    hr.content_type = std::string(req[http::field::content_type]);
    hr.body = std::move(req.body());
    auto t0 = Clock::now();
    HttpResponse out = router.dispatch(hr);
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count();
    spdlog::debug("control: {} {} -> {} ({} us)", hr.method, hr.target, out.status, us);

    // No route takes HEAD (it gets 405), but its answer must still carry no body.
    if (req.method() == http::verb::head) out.body.clear();
    bool keep = req.keep_alive() && !stopping.load();
    stream.set_deadline(Clock::now() + std::chrono::seconds(limits.request_timeout_seconds));
    auto res = ToBeast(out, req.version(), limits.server_header);
    res.keep_alive(keep);
    Write(stream, res);
    if (!keep || ec) break;
  }
  sock.shutdown(asio::socket_base::shutdown_both, ec);
}

}  // namespace rpoint
