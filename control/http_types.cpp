#include "control/http_types.h"

#include <strings.h>

#include "common/json_raw.h"

namespace rpoint {

const std::string* HttpResponse::header(const std::string& name) const {
  for (const auto& [k, v] : headers) {
    if (strcasecmp(k.c_str(), name.c_str()) == 0) return &v;
  }
  return nullptr;
}

int HttpStatusFor(Code code) {
  switch (code) {
    case Code::kOk: return 200;
    case Code::kInvalidArgument: return 400;
    case Code::kOutOfRange: return 400;
    case Code::kUnsupported: return 400;  // a request this resource cannot honour, not a missing feature
    case Code::kNotFound: return 404;
    case Code::kAlreadyExists: return 409;
    case Code::kConflict: return 409;
    case Code::kPermissionDenied: return 403;
    case Code::kNoSpace: return 507;
    case Code::kShutdown: return 503;
    case Code::kIoError: return 500;
    case Code::kCorruption: return 500;
    case Code::kInternal: return 500;
    case Code::kUnavailable: return 503;
  }
  return 500;
}

HttpResponse ErrorResponse(int status, const std::string& code, const std::string& message) {
  nlohmann::ordered_json j = {{"error", {{"code", code}, {"message", message}}}};
  return JsonResponse(status, j);
}

HttpResponse ErrorResponse(const Status& s) {
  return ErrorResponse(HttpStatusFor(s.code()), s.code_name(), s.message());
}

HttpResponse JsonResponse(int status, const nlohmann::ordered_json& body) {
  HttpResponse r;
  r.status = status;
  // Invalid UTF-8 (from a file name, say) is replaced rather than throwing.
  // DumpJson: raw values (a VM configuration) are printed as they were sent.
  r.body = DumpJson(body);
  // Indentation costs up to 2 bytes per nesting level on every line, so a
  // pretty-printed answer can be many times its compact size: only small
  // answers are indented, large ones stay about as large as what was stored.
  if (r.body.size() <= kMaxPrettyResponseBytes) r.body = DumpJson(body, 2);
  r.body += "\n";
  return r;
}

HttpResponse EmptyResponse(int status) {
  HttpResponse r;
  r.status = status;
  r.content_type.clear();
  return r;
}

}  // namespace rpoint
