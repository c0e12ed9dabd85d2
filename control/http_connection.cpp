#include "control/http_connection.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <exception>
#include <string_view>
#include <vector>

namespace rpoint {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Clock = std::chrono::steady_clock;
using error_code = boost::system::error_code;

// After an error answer the client may still be sending (a 413 body): read
// and drop this much at most, for this long at most, before closing.
constexpr size_t kLingerMaxBytes = 64u << 20;
constexpr unsigned kLingerSeconds = 2;

http::response<http::string_body> ToBeast(const HttpResponse& r, unsigned version,
                                          const std::string& server_header) {
  http::response<http::string_body> res{static_cast<http::status>(r.status), version};
  res.set(http::field::server, server_header);
  if (!r.content_type.empty() && !r.body.empty())
    res.set(http::field::content_type, r.content_type);
  for (const auto& [k, v] : r.headers) res.set(k, v);
  res.body() = r.body;
  res.prepare_payload();
  return res;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// The framing problem of a parsed header, or nullopt when its body can be
// delimited without doubt (RFC 9112 §6).
std::optional<HttpResponse> FramingError(const http::request_parser<http::string_body>& parser) {
  const auto& req = parser.get();
  if (req.count(http::field::transfer_encoding) == 0) return std::nullopt;
  if (req.count(http::field::content_length) > 0) {
    return ErrorResponse(400, "BadRequest",
                         "a request may not carry both Transfer-Encoding and Content-Length");
  }
  // Several Transfer-Encoding fields form one list.
  std::vector<std::string> codings;
  auto [first, last] = req.equal_range(http::field::transfer_encoding);
  for (auto f = first; f != last; ++f) {
    std::string_view v(f->value().data(), f->value().size());
    while (true) {
      size_t comma = v.find(',');
      std::string_view t = Trim(v.substr(0, comma));
      if (!t.empty()) codings.emplace_back(t);
      if (comma == std::string_view::npos) break;
      v.remove_prefix(comma + 1);
    }
  }
  if (codings.empty() || !beast::iequals(codings.back(), "chunked")) {
    return ErrorResponse(400, "BadRequest",
                         "Transfer-Encoding must end with 'chunked' (the body's length is "
                         "otherwise unknown)");
  }
  if (codings.size() > 1) {
    return ErrorResponse(
        501, "UnsupportedTransferEncoding",
        "transfer coding '" + codings[0].substr(0, 64) + "' is not supported; only 'chunked' is");
  }
  return std::nullopt;
}

}  // namespace

HttpConnection::HttpConnection(const HttpServeContext& ctx, Socket socket)
    : ctx_(ctx), socket_(std::move(socket)), timer_(ctx.io) {}

void HttpConnection::start() {
  read_request();
}

void HttpConnection::refuse(const HttpResponse& response) {
  write_response(response, 11, false, /*linger=*/true);
}

void HttpConnection::shutdown() {
  // An answer being computed or written is finished first (write_response's
  // completion sees stopping() and closes).
  if (state_ == State::kHandling || state_ == State::kWriting) return;
  close();
}

void HttpConnection::close() {
  if (state_ == State::kClosed) return;
  auto self = shared_from_this();  // the owner may drop its reference below
  state_ = State::kClosed;
  ++timer_generation_;
  timer_.cancel();
  error_code ec;
  socket_.shutdown(asio::socket_base::shutdown_both, ec);
  socket_.close(ec);
  ctx_.owner.connection_closed(this);
}

void HttpConnection::arm_timer(unsigned seconds) {
  timed_out_ = false;
  unsigned gen = ++timer_generation_;
  timer_.expires_after(std::chrono::seconds(seconds));
  timer_.async_wait([self = shared_from_this(), gen](const error_code& ec) {
    if (ec || gen != self->timer_generation_ || self->state_ == State::kClosed) return;
    self->on_timeout();
  });
}

void HttpConnection::on_timeout() {
  switch (state_) {
    case State::kIdle:
    case State::kReading: {
      // The pending read ends with operation_aborted; fail_request answers.
      timed_out_ = true;
      error_code ec;
      socket_.cancel(ec);
      break;
    }
    case State::kHandling:  // no deadline while a handler runs
      break;
    case State::kWriting:
    case State::kLingering:
    case State::kClosed:
      close();
      break;
  }
}

void HttpConnection::read_request() {
  if (state_ == State::kClosed) return;
  if (ctx_.owner.stopping()) {
    close();
    return;
  }
  parser_.emplace();
  parser_->body_limit(ctx_.limits.max_body_bytes);
  parser_->header_limit(static_cast<uint32_t>(ctx_.limits.max_header_bytes));
  state_ = State::kIdle;
  arm_timer(ctx_.limits.idle_timeout_seconds);
  read_header_bytes();
}

// The header is collected whole before Beast parses it, so its raw lines can
// be checked (obs-fold) and the body limit applied before any body is read.
void HttpConnection::read_header_bytes() {
  // Empty lines before a request line are ignored (RFC 9112 §2.2).
  while (buffer_.size() >= 2) {
    auto* p = static_cast<const char*>(buffer_.data().data());
    if (p[0] != '\r' || p[1] != '\n') break;
    buffer_.consume(2);
  }
  if (buffer_.size() > 0 && state_ == State::kIdle) {
    state_ = State::kReading;  // a request has started: it must finish in time
    arm_timer(ctx_.limits.request_timeout_seconds);
  }
  std::string_view data(static_cast<const char*>(buffer_.data().data()), buffer_.size());
  size_t end = data.find("\r\n\r\n");
  if (end != std::string_view::npos) {
    on_header_complete(end + 4);
    return;
  }
  if (buffer_.size() > ctx_.limits.max_header_bytes) {
    answer_error(ErrorResponse(431, "HeadersTooLarge", "request headers are too large"));
    return;
  }
  socket_.async_read_some(buffer_.prepare(4096),
                          [self = shared_from_this()](const error_code& ec, size_t n) {
                            if (self->state_ == State::kClosed) return;
                            if (ec) {
                              self->fail_request(ec);
                              return;
                            }
                            self->buffer_.commit(n);
                            self->read_header_bytes();
                          });
}

void HttpConnection::on_header_complete(size_t header_end) {
  std::string_view head(static_cast<const char*>(buffer_.data().data()), header_end);
  // obs-fold: a header line that begins with a space or tab continues the
  // previous one. Peers disagree on what it means, so it is refused.
  for (size_t p = head.find("\r\n"); p != std::string_view::npos && p + 2 < header_end - 2;
       p = head.find("\r\n", p + 2)) {
    if (head[p + 2] == ' ' || head[p + 2] == '\t') {
      answer_error(ErrorResponse(400, "BadRequest",
                                 "obsolete line folding (a header line starting with a space or "
                                 "tab) is not accepted"));
      return;
    }
  }
  error_code ec;
  size_t used = 0;
  while (!ec && !parser_->is_header_done() && used < header_end) {
    used += parser_->put(asio::buffer(head.data() + used, header_end - used), ec);
  }
  buffer_.consume(used);
  if (!ec && !parser_->is_header_done()) ec = http::error::partial_message;
  if (ec) {
    fail_request(ec);
    return;
  }
  if (auto err = FramingError(*parser_)) {
    answer_error(*err);
    return;
  }
  if (parser_->is_done()) {
    dispatch();
    return;
  }
  auto len = parser_->content_length();
  if (len && *len > ctx_.limits.max_body_bytes) {
    fail_request(http::error::body_limit);  // answer now, before the client sends it
    return;
  }
  const auto& req = parser_->get();
  if (beast::iequals(req[http::field::expect], "100-continue")) {
    auto cont =
        std::make_shared<http::response<http::empty_body>>(http::status::continue_, req.version());
    http::async_write(socket_, *cont,
                      [self = shared_from_this(), cont](const error_code& ec, size_t) {
                        if (self->state_ == State::kClosed) return;
                        if (ec) {
                          self->fail_request(ec);
                          return;
                        }
                        self->read_body();
                      });
    return;
  }
  read_body();
}

void HttpConnection::read_body() {
  http::async_read(socket_, buffer_, *parser_,
                   [self = shared_from_this()](const error_code& ec, size_t) {
                     if (self->state_ == State::kClosed) return;
                     if (ec) {
                       self->fail_request(ec);
                       return;
                     }
                     self->dispatch();
                   });
}

void HttpConnection::fail_request(const error_code& ec) {
  if (ec == asio::error::operation_aborted && timed_out_) {
    if (state_ == State::kIdle) {
      close();  // idle too long: nothing to answer
    } else {
      answer_error(ErrorResponse(408, "RequestTimeout", "request not received in time"));
    }
    return;
  }
  if (ec == http::error::end_of_stream || ec == asio::error::eof ||
      ec == asio::error::connection_reset || ec == asio::error::broken_pipe ||
      ec == asio::error::operation_aborted) {
    close();  // the client went away, or the server stops
    return;
  }
  if (ec == http::error::body_limit) {
    answer_error(ErrorResponse(
        413, "PayloadTooLarge",
        "request body is larger than " + std::to_string(ctx_.limits.max_body_bytes) + " bytes"));
  } else if (ec == http::error::header_limit) {
    answer_error(ErrorResponse(431, "HeadersTooLarge", "request headers are too large"));
  } else {
    answer_error(ErrorResponse(400, "BadRequest", "malformed HTTP request: " + ec.message()));
  }
}

void HttpConnection::dispatch() {
  state_ = State::kHandling;
  ++timer_generation_;
  timer_.cancel();
  auto& req = parser_->get();
  HttpRequest hr;
  hr.method = std::string(req.method_string());
  hr.target = std::string(req.target());
  hr.content_type = std::string(req[http::field::content_type]);
  hr.body = std::move(req.body());
  unsigned version = req.version();
  bool keep = req.keep_alive();
  bool head = req.method() == http::verb::head;
  parser_.reset();
  asio::post(ctx_.workers, [self = shared_from_this(), hr = std::move(hr), version, keep,
                            head]() mutable {
    auto t0 = Clock::now();
    HttpResponse out;
    try {
      out = self->ctx_.router.dispatch(hr);
    } catch (const std::exception& e) {  // the router catches handlers' throws; this is a backstop
      spdlog::error("control: {} {} failed: {}", hr.method, hr.target, e.what());
      out = ErrorResponse(500, "Internal", std::string("internal error: ") + e.what());
    }
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count();
    spdlog::debug("control: {} {} -> {} ({} us)", hr.method, hr.target, out.status, us);
    // No route takes HEAD (it gets 405), but its answer must still carry no body.
    if (head) out.body.clear();
    asio::post(self->ctx_.io, [self, out = std::move(out), version, keep]() {
      if (self->state_ == State::kClosed) return;
      self->write_response(out, version, keep && !self->ctx_.owner.stopping(), false);
    });
  });
}

void HttpConnection::write_response(const HttpResponse& out, unsigned version, bool keep_alive,
                                    bool linger) {
  state_ = State::kWriting;
  arm_timer(ctx_.limits.request_timeout_seconds);
  auto res = std::make_shared<http::response<http::string_body>>(
      ToBeast(out, version, ctx_.limits.server_header));
  res->keep_alive(keep_alive);
  http::async_write(
      socket_, *res,
      [self = shared_from_this(), res, keep_alive, linger](const error_code& ec, size_t) {
        if (self->state_ == State::kClosed) return;
        if (ec) {
          if (ec != asio::error::broken_pipe && ec != asio::error::connection_reset) {
            spdlog::debug("control: writing response: {}", ec.message());
          }
          self->close();
        } else if (linger) {
          self->linger();
        } else if (!keep_alive || self->ctx_.owner.stopping()) {
          self->close();
        } else {
          self->read_request();
        }
      });
}

void HttpConnection::answer_error(const HttpResponse& err) {
  // The stream position is unknown after a refused request: answer and close.
  parser_.reset();
  write_response(err, 11, false, /*linger=*/true);
}

// After answering a request we did not read to the end (413, 400), closing at
// once would make the kernel reset the connection while the client is still
// sending, and it would never read our answer. So: stop sending, then discard
// what still arrives, for a bounded time and amount, before closing.
void HttpConnection::linger() {
  if (state_ != State::kLingering) {
    if (ctx_.owner.stopping()) {
      close();
      return;
    }
    state_ = State::kLingering;
    error_code ec;
    socket_.shutdown(asio::socket_base::shutdown_send, ec);
    arm_timer(kLingerSeconds);
    buffer_.consume(buffer_.size());
  }
  socket_.async_read_some(buffer_.prepare(16384),
                          [self = shared_from_this()](const error_code& ec, size_t n) {
                            if (self->state_ == State::kClosed) return;
                            self->lingered_ += n;
                            if (ec || self->lingered_ >= kLingerMaxBytes) {
                              self->close();
                              return;
                            }
                            self->linger();
                          });
}

}  // namespace rpoint
