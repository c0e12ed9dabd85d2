// Router: maps (method, path pattern) to handlers and owns the protocol-level
// checks every route shares, so handlers only see well-formed requests:
//   bad target / percent-encoding       -> 400 InvalidUrl
//   no route for the path               -> 404 RouteNotFound
//   route exists, method does not       -> 405 MethodNotAllowed + Allow header
//   unsupported ?api-version=           -> 400 InvalidApiVersion
//   query parameter the route not takes -> 400 InvalidQueryParameter
//   handler throws                      -> 500 Internal (logged)
// Patterns are literal segments and {param} segments: "/disks/{name}".
//
// Thread-safety: add() before serving; dispatch() from any number of threads.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "control/http_types.h"
#include "control/url.h"

namespace rpoint {

struct RequestContext {
  const HttpRequest& request;
  const ParsedTarget& target;
  std::vector<std::string> params;  // {param} values, decoded, in pattern order
  std::string api_version;          // resolved (never empty)
};

using Handler = std::function<HttpResponse(const RequestContext&)>;

class Router {
 public:
  // `query_params`: the query parameters this route accepts besides api-version.
  void add(const std::string& method, const std::string& pattern, Handler handler,
           std::vector<std::string> query_params = {});
  HttpResponse dispatch(const HttpRequest& request) const;

 private:
  struct Route {
    std::string method;
    std::vector<std::string> pattern;  // segments; "{x}" is a parameter
    Handler handler;
    std::vector<std::string> query_params;
  };
  static bool Match(const Route& route, const std::vector<std::string>& segments,
                    std::vector<std::string>* params);

  std::vector<Route> routes_;
};

// Parses the body as a JSON object. On failure returns false and sets *error:
// 415 UnsupportedMediaType for a Content-Type other than application/json
// (absent is accepted, and so is application/x-www-form-urlencoded when the
// body is a JSON object: plain `curl -d`), 400 InvalidJson for a missing body,
// bad JSON or a non-object. With `raw_path`, the member there is kept as the
// exact text sent (common/json_raw.h: ParseJsonKeepingRaw).
bool ParseJsonObjectBody(const HttpRequest& request, nlohmann::json* out, HttpResponse* error,
                         const std::vector<std::string_view>& raw_path = {});

}  // namespace rpoint
