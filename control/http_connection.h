// One control-API connection: reads HTTP/1.1 requests with Beast, dispatches
// them through the Router and writes the responses, with keep-alive, a body
// size limit (413), "Expect: 100-continue", and timeouts, until the client
// closes, a timeout passes, or the server stops.
//
// Thread-safety: ServeHttpConnection runs on the connection's own thread; the
// router is shared read-only.
#pragma once

#include <atomic>
#include <cstddef>
#include <string>

#include "common/unique_fd.h"
#include "control/router.h"

namespace rpoint {

struct HttpConnectionLimits {
  size_t max_body_bytes = 1u << 20;
  unsigned idle_timeout_seconds = 60;
  unsigned request_timeout_seconds = 30;
  std::string server_header;  // "rpointd/0.1.0"
};

// Serves `fd` (a connected stream socket) until done, then closes it.
// `stop_fd` becomes readable when the server stops; `stopping` is then true:
// a connection waiting for a request closes at once, one answering a request
// closes after writing the answer.
void ServeHttpConnection(UniqueFd fd, const Router& router, const HttpConnectionLimits& limits,
                         int stop_fd, const std::atomic<bool>& stopping);

// Writes one complete response (e.g. 503 when too many connections are open)
// and returns; the caller closes.
void WriteHttpResponse(int fd, const HttpResponse& response, const std::string& server_header);

}  // namespace rpoint
