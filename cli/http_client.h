// HttpClient: one request/response exchange with rpointd's control socket
// (HTTP/1.1 over a Unix stream socket, Boost.Beast, the same codec as the
// server). Every request carries the API version this CLI was written for.
//
// Thread-safety: none; one per command run.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace rpoint::cli {

// The API version the CLI speaks (pinned, as Azure SDKs pin theirs).
inline constexpr const char* kApiVersion = "2026-11-01";

struct HttpReply {
  int status = 0;
  std::string body;
  std::optional<nlohmann::ordered_json> json;  // the body, when it is JSON
  std::vector<std::pair<std::string, std::string>> headers;

  // The first header of this name (case-insensitive), or nullptr.
  const std::string* header(const std::string& name) const;

  // error.code / error.message from an error body, or something readable.
  std::string error_code() const;
  std::string error_message() const;
};

class HttpClient {
 public:
  explicit HttpClient(std::string socket_path) : socket_path_(std::move(socket_path)) {}

  // `path` without the api-version, e.g. "/disks/a?force=true". A non-ok
  // Status (code kShutdown) means the daemon could not be reached or the
  // connection broke; an HTTP error status is a reply, not a Status.
  Result<HttpReply> request(const std::string& method, const std::string& path,
                            const std::optional<nlohmann::ordered_json>& body = std::nullopt);

  const std::string& socket_path() const { return socket_path_; }

 private:
  std::string socket_path_;
};

}  // namespace rpoint::cli
