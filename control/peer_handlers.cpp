#include "control/peer_handlers.h"

#include "control/handler_common.h"

namespace rpoint {

namespace {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

Result<json> Body(const RequestContext& ctx) {
  json j = json::parse(ctx.request.body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return Status::InvalidArgument("the request body must be a JSON object");
  }
  return j;
}

HttpResponse Json(int status, const json& j) {
  return JsonResponse(status, ojson::parse(j.dump()));
}

HttpResponse Hello(RestoreService& svc, const RequestContext&) {
  json regions = json::array();
  for (const auto& r : svc.regions()) {
    if (r.peer.empty()) regions.push_back(r.name);
  }
  return Json(200, {{"service", "rpointd-peer"}, {"regions", regions}});
}

HttpResponse PutCollection(RestoreService& svc, const RequestContext& ctx) {
  auto body = Body(ctx);
  if (!body.ok()) return ErrorResponse(body.status());
  if (Status s = CheckFields(body.value(), {"sourceVm", "region"}, "body"); !s.ok()) {
    return ErrorResponse(s);
  }
  auto vm = StringField(body.value().value("sourceVm", json()), "sourceVm");
  auto region = StringField(body.value().value("region", json()), "region");
  if (!vm.ok()) return ErrorResponse(vm.status());
  if (!region.ok()) return ErrorResponse(region.status());
  auto r = svc.put_peer_collection(ctx.params[0], vm.value(), region.value());
  if (!r.ok()) return ErrorResponse(r.status());
  const CollectionRecord& c = r->first;
  return Json(r->second ? 201 : 200,
              {{"name", c.name}, {"sourceVm", c.source_vm}, {"region", c.region}});
}

HttpResponse PointState(RestoreService& svc, const std::string& c, const std::string& rp,
                        int status) {
  auto s = svc.peer_point_state(c, rp);
  if (!s.ok()) return ErrorResponse(s.status());
  return Json(status, EncodePeerPointState(s.value()));
}

HttpResponse PostPoint(RestoreService& svc, const RequestContext& ctx) {
  auto body = Body(ctx);
  if (!body.ok()) return ErrorResponse(body.status());
  auto pull = DecodePeerPull(body.value());
  if (!pull.ok()) return ErrorResponse(pull.status());
  auto started = svc.receive_restore_point(ctx.params[0], ctx.params[1], pull.value());
  if (!started.ok()) return ErrorResponse(started.status());
  return PointState(svc, ctx.params[0], ctx.params[1], started->created ? 201 : 200);
}

// The sender ends a copy it posted: 200 with the point's state after it
// (Failed), 204 when the abort deleted it.
HttpResponse AbortPoint(RestoreService& svc, const RequestContext& ctx) {
  auto body = Body(ctx);
  if (!body.ok()) return ErrorResponse(body.status());
  auto abort = DecodePeerAbort(body.value());
  if (!abort.ok()) return ErrorResponse(abort.status());
  auto r = svc.abort_peer_receive(ctx.params[0], ctx.params[1], abort.value());
  if (!r.ok()) return ErrorResponse(r.status());
  if (!r.value()) return EmptyResponse(204);
  return Json(200, EncodePeerPointState(*r.value()));
}

}  // namespace

void AddPeerRoutes(Router& router, RestoreService& svc) {
  router.add("GET", "/peer/v1", [&svc](const RequestContext& ctx) { return Hello(svc, ctx); });
  router.add("PUT", "/peer/v1/restorePointCollections/{c}",
             [&svc](const RequestContext& ctx) { return PutCollection(svc, ctx); });
  router.add("POST", "/peer/v1/restorePointCollections/{c}/restorePoints/{rp}",
             [&svc](const RequestContext& ctx) { return PostPoint(svc, ctx); });
  router.add("POST", "/peer/v1/restorePointCollections/{c}/restorePoints/{rp}/abort",
             [&svc](const RequestContext& ctx) { return AbortPoint(svc, ctx); });
  router.add("GET", "/peer/v1/restorePointCollections/{c}/restorePoints/{rp}",
             [&svc](const RequestContext& ctx) {
               return PointState(svc, ctx.params[0], ctx.params[1], 200);
             });
}

}  // namespace rpoint
