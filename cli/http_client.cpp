#include "cli/http_client.h"

#include <strings.h>

#include "control/beast.h"

#ifndef RPOINT_VERSION
#define RPOINT_VERSION "unknown"
#endif

namespace rpoint::cli {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

const std::string* HttpReply::header(const std::string& name) const {
  for (const auto& [k, v] : headers) {
    if (strcasecmp(k.c_str(), name.c_str()) == 0) return &v;
  }
  return nullptr;
}

std::string HttpReply::error_code() const {
  if (json && json->is_object() && json->contains("error") && (*json)["error"].is_object()) {
    const auto& e = (*json)["error"];
    if (e.contains("code") && e["code"].is_string()) return e["code"].get<std::string>();
  }
  return "HTTP" + std::to_string(status);
}

std::string HttpReply::error_message() const {
  if (json && json->is_object() && json->contains("error") && (*json)["error"].is_object()) {
    const auto& e = (*json)["error"];
    if (e.contains("message") && e["message"].is_string()) return e["message"].get<std::string>();
  }
  std::string b = body.substr(0, 200);
  return "HTTP " + std::to_string(status) + (b.empty() ? "" : ": " + b);
}

Result<HttpReply> HttpClient::request(const std::string& method, const std::string& path,
                                      const std::optional<nlohmann::ordered_json>& body) {
  asio::io_context ioc;
  asio::local::stream_protocol::socket sock(ioc);
  boost::system::error_code ec;
  sock.connect(asio::local::stream_protocol::endpoint(socket_path_), ec);
  if (ec) {
    std::string hint = ec == asio::error::access_denied
                           ? " (permission denied: run as root or as a member of the socket's group)"
                           : " (is rpointd running? set --socket or $RPOINT_SOCKET)";
    return Status::Shutdown("cannot connect to rpointd at " + socket_path_ + ": " + ec.message() +
                            hint);
  }

  std::string target = path + (path.find('?') == std::string::npos ? "?" : "&") +
                       "api-version=" + kApiVersion;
  http::request<http::string_body> req{http::string_to_verb(method), target, 11};
  if (req.method() == http::verb::unknown) req.method_string(method);
  req.set(http::field::host, "localhost");
  req.set(http::field::user_agent, std::string("rpoint/") + RPOINT_VERSION);
  req.set(http::field::accept, "application/json");
  req.keep_alive(false);
  if (body) {
    req.set(http::field::content_type, "application/json");
    req.body() = body->dump();
  }
  req.prepare_payload();
  http::write(sock, req, ec);
  if (ec) return Status::Shutdown("sending the request to rpointd failed: " + ec.message());

  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(256u << 20);  // a long list of resources, not a file
  http::read(sock, buffer, parser, ec);
  if (ec) {
    return Status::Shutdown("rpointd closed the connection without a complete answer: " +
                            ec.message());
  }
  HttpReply reply;
  reply.status = static_cast<int>(parser.get().result_int());
  for (const auto& field : parser.get()) {
    reply.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
  }
  reply.body = std::move(parser.get().body());
  if (!reply.body.empty()) {
    auto j = nlohmann::ordered_json::parse(reply.body, nullptr, false);
    if (!j.is_discarded()) reply.json = std::move(j);
  }
  return reply;
}

}  // namespace rpoint::cli
