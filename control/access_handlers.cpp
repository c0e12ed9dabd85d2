#include "control/access_handlers.h"

#include "disks/disk_service.h"
#include "control/handler_common.h"
#include "control/operation_handlers.h"

namespace rpoint {

namespace {

using nlohmann::json;

bool ValidNames(const RequestContext& ctx, HttpResponse* err) {
  static const char* const kKinds[] = {"collection name", "restore point name",
                                       "disk restore point name"};
  for (size_t i = 0; i < ctx.params.size() && i < 3; ++i) {
    if (Status s = DiskService::ValidateName(ctx.params[i], kKinds[i]); !s.ok()) {
      *err = ErrorResponse(s);
      return false;
    }
  }
  return true;
}

// {"access": "Read", "durationInSeconds": N[, "listener": "tcp"|"unix"]}
HttpResponse BeginGetAccess(AccessGrants& grants, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  json body;
  if (!ParseJsonObjectBody(ctx.request, &body, &err)) return err;
  if (Status s = CheckFields(body, {"access", "durationInSeconds", "listener"}, "the request body");
      !s.ok()) {
    return ErrorResponse(s);
  }
  if (!body.contains("access") || !body.contains("durationInSeconds")) {
    return ErrorResponse(Status::InvalidArgument(
        "'access' and 'durationInSeconds' are required, e.g. {\"access\": \"Read\", "
        "\"durationInSeconds\": 3600}"));
  }
  auto access = StringField(body["access"], "access");
  if (!access.ok()) return ErrorResponse(access.status());
  auto duration = UnsignedField(body["durationInSeconds"], "durationInSeconds", "seconds");
  if (!duration.ok()) return ErrorResponse(duration.status());
  std::string listener;
  if (auto it = body.find("listener"); it != body.end() && !it->is_null()) {
    auto l = StringField(*it, "listener");
    if (!l.ok()) return ErrorResponse(l.status());
    listener = l.value();
  }
  auto started = grants.begin_get_access(ctx.params[0], ctx.params[1], ctx.params[2],
                                         access.value(), duration.value(), listener);
  if (!started.ok()) return ErrorResponse(started.status());
  auto op = grants.get_operation(started->operation_id);
  if (!op) return ErrorResponse(Status::Internal("the access grant ended while it was made"));
  return OperationStarted(202, OperationToJson(*op), started->operation_id);
}

// No body (or {}). 200 {"revoked": bool}: false when no grant was active.
HttpResponse EndGetAccess(AccessGrants& grants, const RequestContext& ctx) {
  HttpResponse err;
  if (!ValidNames(ctx, &err)) return err;
  json body;
  if (!ReadActionBody(ctx, &body, &err)) return err;
  if (!body.empty()) {
    return ErrorResponse(Status::InvalidArgument("endGetAccess takes no request body fields"));
  }
  auto r = grants.end_get_access(ctx.params[0], ctx.params[1], ctx.params[2]);
  if (!r.ok()) return ErrorResponse(r.status());
  return JsonResponse(200, nlohmann::ordered_json{{"revoked", r.value()}});
}

}  // namespace

void AddAccessRoutes(Router& router, AccessGrants& grants) {
  AccessGrants* g = &grants;
  const std::string drp =
      "/restorePointCollections/{collection}/restorePoints/{restorePoint}/diskRestorePoints/{disk}";
  router.add("POST", drp + "/beginGetAccess",
             [g](const RequestContext& c) { return BeginGetAccess(*g, c); });
  router.add("POST", drp + "/endGetAccess",
             [g](const RequestContext& c) { return EndGetAccess(*g, c); });
}

}  // namespace rpoint
