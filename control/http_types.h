// HttpRequest / HttpResponse: the control API's view of one HTTP exchange,
// independent of the wire library (Beast lives only in control_server.cpp), so
// routing and handlers are unit-testable without sockets.
//
// Also the one place where a Status becomes an HTTP status and a
// {"error": {"code", "message"}} body.
// Thread-safety: plain values.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace rpoint {

struct HttpRequest {
  std::string method;        // "GET", "PUT", ...
  std::string target;        // origin-form: "/disks/a?api-version=2026-11-01"
  std::string content_type;  // empty when the header is absent
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;  // besides Content-Type/Length
  std::string body;                                          // JSON text, or empty
  std::string content_type = "application/json";

  const std::string* header(const std::string& name) const;
};

// HTTP status for a service Status (see docs/api.md, "Errors").
int HttpStatusFor(Code code);

// {"error": {"code": code, "message": message}} with the given status.
HttpResponse ErrorResponse(int status, const std::string& code, const std::string& message);
// An error from a service: status from its code, error.code = code_name().
HttpResponse ErrorResponse(const Status& s);
// ordered_json: members appear in the order handlers add them (id, name, type,
// properties), as in Azure's responses, rather than sorted.
// JSON answers whose compact form is larger than this are sent compact (no
// indentation), so no answer grows much beyond the data it carries.
inline constexpr size_t kMaxPrettyResponseBytes = 64 * 1024;
HttpResponse JsonResponse(int status, const nlohmann::ordered_json& body);
HttpResponse EmptyResponse(int status);

}  // namespace rpoint
