#include "control/operation_handlers.h"

#include "control/handler_common.h"
#include "restore/access_grants.h"

namespace rpoint {

namespace {

// Ids are the service's own ([0-9a-f-]); anything else cannot name one, and
// answering 404 early keeps odd strings out of the service and the logs.
bool PlausibleId(const std::string& id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || c == '-')) return false;
  }
  return true;
}

HttpResponse GetOperation(RestoreService& svc, AccessGrants* grants, const RequestContext& ctx) {
  const std::string& id = ctx.params[0];
  if (!PlausibleId(id)) {
    return ErrorResponse(Status::NotFound("operation '" + id + "' not found"));
  }
  if (grants) {
    if (auto g = grants->get_operation(id)) return JsonResponse(200, OperationToJson(*g));
  }
  auto op = svc.get_operation(id);
  if (!op.ok()) return ErrorResponse(op.status());
  HttpResponse r = JsonResponse(200, OperationToJson(op.value()));
  // Azure clients poll again after Retry-After while the job runs.
  if (op->status == "InProgress") r.headers.emplace_back("Retry-After", "1");
  return r;
}

HttpResponse ListOperations(RestoreService& svc) {
  auto ops = svc.list_operations();
  if (!ops.ok()) return ErrorResponse(ops.status());
  nlohmann::ordered_json items = nlohmann::ordered_json::array();
  for (const OperationRecord& op : ops.value()) items.push_back(OperationToJson(op));
  return ListResponse(std::move(items));
}

}  // namespace

nlohmann::ordered_json OperationToJson(const OperationRecord& op) {
  nlohmann::ordered_json j = {{"id", OperationPath(op.id)},
                              {"name", op.id},
                              {"status", op.status},
                              {"startTime", op.start_time}};
  if (!op.end_time.empty()) j["endTime"] = op.end_time;
  j["percentComplete"] = op.percent_complete;
  if (op.status == "Failed") {
    j["error"] = {{"code", op.error_code}, {"message", op.error_message}};
  }
  nlohmann::ordered_json props = {{"kind", op.kind}, {"resourceId", op.resource_id}};
  if (!op.result.is_null()) props["output"] = nlohmann::ordered_json(op.result);
  j["properties"] = std::move(props);
  return j;
}

void AddOperationRoutes(Router& router, RestoreService& restore, AccessGrants* grants) {
  RestoreService* svc = &restore;
  router.add("GET", "/operations", [svc](const RequestContext&) { return ListOperations(*svc); });
  router.add("GET", "/operations/{id}",
             [svc, grants](const RequestContext& c) { return GetOperation(*svc, grants, c); });
}

}  // namespace rpoint
