#include "control/router.h"

#include <spdlog/spdlog.h>
#include <strings.h>

#include <algorithm>
#include <exception>

#include "common/json_parse.h"
#include "common/json_raw.h"
#include "control/api_version.h"

namespace rpoint {

namespace {

std::vector<std::string> SplitPattern(const std::string& pattern) {
  std::vector<std::string> out;
  size_t start = 1;
  while (start <= pattern.size() && pattern.size() > 1) {
    size_t slash = pattern.find('/', start);
    out.push_back(pattern.substr(start, slash == std::string::npos ? slash : slash - start));
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return out;
}

bool IsParam(const std::string& seg) {
  return seg.size() >= 2 && seg.front() == '{' && seg.back() == '}';
}

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

}  // namespace

void Router::add(const std::string& method, const std::string& pattern, Handler handler,
                 std::vector<std::string> query_params) {
  routes_.push_back({method, SplitPattern(pattern), std::move(handler), std::move(query_params)});
}

bool Router::Match(const Route& route, const std::vector<std::string>& segments,
                   std::vector<std::string>* params) {
  if (route.pattern.size() != segments.size()) return false;
  std::vector<std::string> found;
  for (size_t i = 0; i < segments.size(); ++i) {
    if (IsParam(route.pattern[i])) {
      if (segments[i].empty()) return false;
      found.push_back(segments[i]);
    } else if (route.pattern[i] != segments[i]) {
      return false;
    }
  }
  *params = std::move(found);
  return true;
}

HttpResponse Router::dispatch(const HttpRequest& request) const {
  auto target = ParseTarget(request.target);
  if (!target.ok()) return ErrorResponse(400, "InvalidUrl", target.status().message());

  const Route* chosen = nullptr;
  std::vector<std::string> params;
  std::vector<std::string> allowed;
  for (const Route& r : routes_) {
    std::vector<std::string> p;
    if (!Match(r, target->segments, &p)) continue;
    if (std::find(allowed.begin(), allowed.end(), r.method) == allowed.end()) {
      allowed.push_back(r.method);
    }
    if (r.method == request.method && chosen == nullptr) {
      chosen = &r;
      params = std::move(p);
    }
  }
  if (allowed.empty()) {
    return ErrorResponse(404, "RouteNotFound", "no resource at " + target->path);
  }
  if (chosen == nullptr) {
    std::string allow;
    for (const auto& m : allowed) allow += (allow.empty() ? "" : ", ") + m;
    HttpResponse r = ErrorResponse(405, "MethodNotAllowed",
                                   "method " + request.method + " is not allowed on " +
                                       target->path + "; allowed: " + allow);
    r.headers.emplace_back("Allow", allow);
    return r;
  }

  auto version = ResolveApiVersion(target->query_param("api-version"));
  if (!version.ok()) return ErrorResponse(400, "InvalidApiVersion", version.status().message());
  for (const auto& [k, v] : target->query) {
    if (k == "api-version") continue;
    if (std::find(chosen->query_params.begin(), chosen->query_params.end(), k) ==
        chosen->query_params.end()) {
      std::string accepted = "api-version";
      for (const auto& q : chosen->query_params) accepted += ", " + q;
      return ErrorResponse(400, "InvalidQueryParameter",
                           "unknown query parameter '" + k + "' for " + request.method + " " +
                               target->path + "; accepted: " + accepted);
    }
  }

  RequestContext ctx{request, target.value(), std::move(params), std::move(version).value()};
  try {
    return chosen->handler(ctx);
  } catch (const std::exception& e) {
    spdlog::error("control: {} {} failed: {}", request.method, request.target, e.what());
    return ErrorResponse(500, "Internal", std::string("internal error: ") + e.what());
  }
}

bool ParseJsonObjectBody(const HttpRequest& request, nlohmann::json* out, HttpResponse* error,
                         const std::vector<std::string_view>& raw_path) {
  // `curl -d` labels its body application/x-www-form-urlencoded unless told
  // otherwise; a body of that type that is JSON is taken as JSON (a form
  // body never parses as a JSON object, so nothing is misread).
  bool form = false;
  if (!request.content_type.empty()) {
    std::string media = Trim(request.content_type.substr(0, request.content_type.find(';')));
    form = strcasecmp(media.c_str(), "application/x-www-form-urlencoded") == 0;
    if (strcasecmp(media.c_str(), "application/json") != 0 && !form) {
      *error = ErrorResponse(415, "UnsupportedMediaType",
                             "request body must be JSON (Content-Type: application/json), got '" +
                                 request.content_type + "'");
      return false;
    }
  }
  if (request.body.empty()) {
    *error = ErrorResponse(400, "InvalidJson", "request body is empty; a JSON object is required");
    return false;
  }
  // One strict parser (common/json_parse.h): bounded depth, no duplicate keys,
  // no numbers that do not fit (except inside an opaque member kept raw).
  auto j = raw_path.empty() ? ParseJson(request.body) : ParseJsonKeepingRaw(request.body, raw_path);
  if (form && (!j.ok() || !j->is_object())) {
    *error = ErrorResponse(415, "UnsupportedMediaType",
                           "request body must be a JSON object (Content-Type: application/json); "
                           "got a form body ('" +
                               request.content_type + "')");
    return false;
  }
  if (!j.ok()) {
    *error = ErrorResponse(400, "InvalidJson",
                           "request body is not valid JSON: " + j.status().message());
    return false;
  }
  *out = std::move(j).value();
  if (!out->is_object()) {
    *error = ErrorResponse(400, "InvalidJson", "request body must be a JSON object");
    return false;
  }
  return true;
}

}  // namespace rpoint
