// The control API's routes (control/*_handlers.h) through the Router with a
// real DiskService and RestoreService on a temporary directory.
#include <doctest/doctest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

#include <chrono>
#include <thread>

#include "control/disk_handlers.h"
#include "control/operation_handlers.h"
#include "control/restore_point_handlers.h"
#include "control/service_handlers.h"
#include "control/vm_handlers.h"
#include "restore/restore_service.h"
#include "services_fixture.h"

using namespace rpoint;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

struct Fixture : Services {
  Router router;

  Fixture() : Services("/tmp/rpoint-http-XXXXXX") {
    AddServiceRoutes(router, *svc, "9.9.9");
    AddDiskRoutes(router, *svc, *restore);
    AddVmRoutes(router, *restore);
    AddRestorePointRoutes(router, *restore);
    AddOperationRoutes(router, *restore);
  }

  HttpResponse call(const std::string& method, const std::string& target,
                    const std::string& body = "") {
    return router.dispatch({method, target, body.empty() ? "" : "application/json", body});
  }
  HttpResponse call(const std::string& method, const std::string& target, const json& body) {
    return call(method, target, body.dump());
  }
};

json Body(const HttpResponse& r) { return json::parse(r.body); }
std::string ErrCode(const HttpResponse& r) { return Body(r)["error"]["code"].get<std::string>(); }
std::string Message(const HttpResponse& r) {
  return Body(r)["error"]["message"].get<std::string>();
}

json Create(uint64_t size, const char* kind = nullptr) {
  json p = {{"sizeBytes", size}};
  if (kind) p["kind"] = kind;
  return {{"properties", p}};
}

constexpr uint64_t kMiB = 1 << 20;

}  // namespace

TEST_CASE("GET / and GET /health") {
  Fixture f;
  auto r = f.call("GET", "/");
  CHECK(r.status == 200);
  CHECK(Body(r)["version"] == "9.9.9");
  CHECK(Body(r)["apiVersions"] == json::array({"2026-11-01"}));
  CHECK(Body(r)["latestApiVersion"] == "2026-11-01");
  auto h = f.call("GET", "/health");
  CHECK(h.status == 200);
  CHECK(Body(h)["status"] == "Healthy");
  CHECK(Body(h)["disks"] == 0);
}

TEST_CASE("PUT creates (201), repeats (200), conflicts (409)") {
  Fixture f;
  auto r = f.call("PUT", "/disks/vm1", Create(16 * kMiB));
  REQUIRE(r.status == 201);
  json d = Body(r);
  CHECK(d["id"] == "/disks/vm1");
  CHECK(d["name"] == "vm1");
  CHECK(d["type"] == "rpoint/disks");
  json p = d["properties"];
  CHECK(p["sizeBytes"] == 16 * kMiB);
  CHECK(p["kind"] == "managed");
  CHECK(p["diskState"] == "Unattached");
  CHECK(p["attachedClients"] == 0);
  CHECK(p["provisioningState"] == "Succeeded");
  CHECK(p["export"]["nbd"]["name"] == "vm1");
  CHECK(p["deviceType"] == "File");
  CHECK(p["creationData"]["createOption"] == "Empty");
  CHECK(p["timeCreated"].get<std::string>().size() == 27);
  CHECK_FALSE(p.contains("error"));

  auto again = f.call("PUT", "/disks/vm1", Create(16 * kMiB));
  CHECK(again.status == 200);
  CHECK(Body(again) == d);

  auto bigger = f.call("PUT", "/disks/vm1", Create(32 * kMiB));
  CHECK(bigger.status == 409);
  CHECK(ErrCode(bigger) == "AlreadyExists");
  CHECK(Message(bigger).find("PATCH") != std::string::npos);
  CHECK(f.call("PUT", "/disks/vm1", Create(16 * kMiB, "shared")).status == 409);
  CHECK(f.call("PUT", "/disks/vm1", json{{"properties", {{"path", "/etc/hostname"}}}}).status ==
        409);
  // The GET result's identity fields may be sent back.
  json echo = Create(16 * kMiB);
  echo["name"] = "vm1";
  echo["id"] = "/disks/vm1";
  echo["type"] = "rpoint/disks";
  CHECK(f.call("PUT", "/disks/vm1", echo).status == 200);
}

TEST_CASE("PUT adopts with properties.path") {
  Fixture f;
  std::string img = f.dir + "/img.raw";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 4 * kMiB);
  auto r = f.call("PUT", "/disks/ad", json{{"properties", {{"path", img}, {"kind", "shared"}}}});
  REQUIRE(r.status == 201);
  CHECK(Body(r)["properties"]["creationData"]["createOption"] == "Attach");
  CHECK(Body(r)["properties"]["sizeBytes"] == 4 * kMiB);
  CHECK(Body(r)["properties"]["kind"] == "shared");
  CHECK(f.call("PUT", "/disks/ad", json{{"properties", {{"path", img}, {"kind", "shared"}}}})
            .status == 200);
  CHECK(f.call("PUT", "/disks/ad", json{{"properties", {{"path", img}}}}).status == 409);
  auto missing = f.call("PUT", "/disks/m", json{{"properties", {{"path", f.dir + "/nope"}}}});
  CHECK(missing.status == 400);
  CHECK(Message(missing).find("does not exist") != std::string::npos);
  auto twice = f.call("PUT", "/disks/other", json{{"properties", {{"path", img}}}});
  CHECK(twice.status == 409);
  CHECK(ErrCode(twice) == "Conflict");
}

TEST_CASE("PUT validation errors are 400 and name the problem") {
  Fixture f;
  struct Case {
    const char* target;
    std::string body;
    const char* needle;
  } cases[] = {
      {"/disks/ok", R"({"properties": {"sizeBytes": 1048576, "colour": "red"}})", "'colour'"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 1048576, "diskState": "x"}})", "read-only"},
      {"/disks/ok", R"({"properties": {"sizeBytes": "1G"}})", "integer"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 1.5}})", "integer"},
      {"/disks/ok", R"({"properties": {"sizeBytes": -512}})", "positive"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 0}})", "positive"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 1000}})", "multiple of 512"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 99999999999999999999}})", "integer"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 2251799813685248}})", "1 PiB"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 1048576, "kind": "weird"}})", "kind"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 1048576, "kind": 3}})", "string"},
      {"/disks/ok", R"({"properties": {}})", "exactly one"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 1048576, "path": "/x"}})", "exactly one"},
      {"/disks/ok", R"({"properties": {"path": "relative"}})", "absolute"},
      {"/disks/ok", R"({"properties": []})", "object"},
      {"/disks/ok", R"({})", "required"},
      {"/disks/ok", R"({"properties": {"sizeBytes": 1048576}, "tags": {}})", "'tags'"},
      {"/disks/ok", R"({"name": "other", "properties": {"sizeBytes": 1048576}})", "match"},
      {"/disks/.hidden", R"({"properties": {"sizeBytes": 1048576}})", "start"},
      {"/disks/a%2Fb", R"({"properties": {"sizeBytes": 1048576}})", "only contain"},
      {"/disks/..", R"({"properties": {"sizeBytes": 1048576}})", "start"},
  };
  for (const auto& c : cases) {
    auto r = f.call("PUT", c.target, c.body);
    CHECK_MESSAGE(r.status == 400, c.body);
    std::string m = Message(r);
    CHECK_MESSAGE(m.find(c.needle) != std::string::npos, c.body, " -> ", m);
  }
  auto name = f.call("PUT", "/disks/" + std::string(64, 'a'), Create(kMiB));
  CHECK(name.status == 400);
  CHECK(f.svc->list().empty());
}

TEST_CASE("PUT body problems: 400 InvalidJson, 415 media type") {
  Fixture f;
  CHECK(ErrCode(f.call("PUT", "/disks/a", std::string("{nope"))) == "InvalidJson");
  CHECK(ErrCode(f.call("PUT", "/disks/a", std::string(""))) == "InvalidJson");
  auto r = f.router.dispatch({"PUT", "/disks/a", "text/plain", Create(kMiB).dump()});
  CHECK(r.status == 415);
}

TEST_CASE("GET, list, PATCH, DELETE") {
  Fixture f;
  REQUIRE(f.call("PUT", "/disks/b", Create(kMiB)).status == 201);
  REQUIRE(f.call("PUT", "/disks/a", Create(kMiB, "ephemeral")).status == 201);

  auto list = f.call("GET", "/disks");
  CHECK(list.status == 200);
  json v = Body(list)["value"];
  REQUIRE(v.size() == 2);
  CHECK(v[0]["name"] == "a");
  CHECK(v[1]["name"] == "b");

  CHECK(f.call("GET", "/disks/a").status == 200);
  auto nf = f.call("GET", "/disks/zz");
  CHECK(nf.status == 404);
  CHECK(ErrCode(nf) == "NotFound");
  CHECK(f.call("GET", "/disks/bad%20name").status == 400);

  auto grow = f.call("PATCH", "/disks/a", json{{"properties", {{"sizeBytes", 4 * kMiB}}}});
  CHECK(grow.status == 200);
  CHECK(Body(grow)["properties"]["sizeBytes"] == 4 * kMiB);
  auto shrink = f.call("PATCH", "/disks/a", json{{"properties", {{"sizeBytes", kMiB}}}});
  CHECK(shrink.status == 400);
  CHECK(ErrCode(shrink) == "OutOfRange");
  auto kind = f.call("PATCH", "/disks/a", json{{"properties", {{"kind", "shared"}}}});
  CHECK(kind.status == 400);
  CHECK(Message(kind).find("cannot be changed") != std::string::npos);
  CHECK(f.call("PATCH", "/disks/a", json{{"properties", json::object()}}).status == 200);
  CHECK(f.call("PATCH", "/disks/zz", json{{"properties", {{"sizeBytes", 4 * kMiB}}}}).status ==
        404);
  CHECK(f.call("PATCH", "/disks/a", std::string("")).status == 400);

  CHECK(f.call("DELETE", "/disks/a?force=maybe").status == 400);
  CHECK(f.call("DELETE", "/disks/a?forse=true").status == 400);
  CHECK(f.call("DELETE", "/disks/a").status == 204);
  CHECK(f.call("DELETE", "/disks/a").status == 404);
  CHECK(f.call("DELETE", "/disks/b?force=false").status == 204);
  CHECK(Body(f.call("GET", "/disks"))["value"].empty());

  auto m = f.call("POST", "/disks");
  CHECK(m.status == 405);
  CHECK(*m.header("Allow") == "GET");
  auto m2 = f.call("POST", "/disks/a");
  CHECK(*m2.header("Allow") == "GET, PUT, PATCH, DELETE");
}

TEST_CASE("DELETE of an attached disk: 409 unless force") {
  Fixture f;
  REQUIRE(f.call("PUT", "/disks/a", Create(kMiB)).status == 201);
  BlockDevice::Use use(f.svc->find_export("a"));
  auto g = Body(f.call("GET", "/disks/a"));
  CHECK(g["properties"]["diskState"] == "Attached");
  CHECK(g["properties"]["attachedClients"] == 1);
  auto r = f.call("DELETE", "/disks/a");
  CHECK(r.status == 409);
  CHECK(ErrCode(r) == "Conflict");
  CHECK(f.call("DELETE", "/disks/a?force=true").status == 204);
  CHECK(use->retired());
}

// ---- VMs, collections, restore points, operations ----

namespace {

// Polls the operation a 201/202 named until it is done; returns its JSON.
json WaitDone(Fixture& f, const HttpResponse& started) {
  const std::string* op = started.header("Azure-AsyncOperation");
  REQUIRE(op != nullptr);
  CHECK(*started.header("Location") == *op);
  CHECK(*started.header("Retry-After") == "1");
  for (int i = 0; i < 500; ++i) {
    auto r = f.call("GET", *op);
    REQUIRE(r.status == 200);
    json j = Body(r);
    if (j["status"] != "InProgress") return j;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL("operation did not finish");
  return {};
}

void MakeVm(Fixture& f) {
  REQUIRE(f.call("PUT", "/disks/a", Create(kMiB)).status == 201);
  REQUIRE(f.call("PUT", "/disks/tmp", Create(kMiB, "ephemeral")).status == 201);
  auto vm = f.call("PUT", "/vms/vm1",
                   json{{"properties", {{"disks", {{{"id", "/disks/a"}}, "/disks/tmp"}},
                                        {"configuration", {{"cpus", 2}}}}}});
  REQUIRE(vm.status == 201);
  REQUIRE(f.call("PUT", "/restorePointCollections/c",
                 json{{"properties", {{"source", {{"id", "/vms/vm1"}}}}}})
              .status == 201);
}

}  // namespace

TEST_CASE("VMs: strict bodies, 201/200, disks in a VM cannot be deleted") {
  Fixture f;
  REQUIRE(f.call("PUT", "/disks/a", Create(kMiB)).status == 201);
  REQUIRE(f.call("PUT", "/disks/b", Create(kMiB)).status == 201);
  json body = {{"properties", {{"disks", {{{"id", "/disks/a"}}}}}}};
  auto r = f.call("PUT", "/vms/vm1", body);
  REQUIRE(r.status == 201);
  CHECK(Body(r)["properties"]["disks"][0]["name"] == "a");
  CHECK(Body(r)["properties"]["configuration"] == json::object());
  CHECK(f.call("PUT", "/vms/vm1", body).status == 200);

  auto e = f.call("PUT", "/vms/vm2", json{{"properties", {{"disks", {"/disks/a"}}}}});
  CHECK(e.status == 409);
  CHECK(Message(e).find("'vm1'") != std::string::npos);
  e = f.call("PUT", "/vms/vm2", json{{"properties", {{"disks", {"/disks/b", "/disks/b"}}}}});
  CHECK(e.status == 400);
  e = f.call("PUT", "/vms/vm2", json{{"properties", {{"disks", {"/disks/b"}}, {"cpu", 1}}}});
  CHECK(e.status == 400);
  CHECK(Message(e).find("'cpu'") != std::string::npos);
  CHECK(f.call("PUT", "/vms/vm2", json{{"properties", {{"disks", {"/vms/b"}}}}}).status == 400);
  CHECK(f.call("PUT", "/vms/vm2", json{{"properties", json::object()}}).status == 400);
  CHECK(f.call("PUT", "/vms/vm2", json{{"properties", {{"disks", {"/disks/b"}}}}, {"id", "/vms/x"}})
            .status == 400);

  e = f.call("DELETE", "/disks/a");
  CHECK(e.status == 409);
  CHECK(Message(e).find("VM 'vm1'") != std::string::npos);
  CHECK(f.call("DELETE", "/vms/vm1").status == 204);
  CHECK(f.call("DELETE", "/vms/vm1").status == 404);
  CHECK(f.call("DELETE", "/disks/a").status == 204);
}

TEST_CASE("restore points: 201 + operation headers, $expand, disk restore") {
  Fixture f;
  MakeVm(f);
  CHECK(Body(f.call("GET", "/regions"))["value"][0]["name"] == "local");
  auto bad = f.call("PUT", "/restorePointCollections/c2",
                    json{{"location", "moon"}, {"properties", {{"source", {{"id", "/vms/vm1"}}}}}});
  CHECK(bad.status == 400);
  CHECK(Message(bad).find("'local'") != std::string::npos);

  // An ephemeral disk must be excluded; the message names it.
  auto e = f.call("PUT", "/restorePointCollections/c/restorePoints/rp1", std::string(""));
  CHECK(e.status == 400);
  CHECK(Message(e).find("'tmp'") != std::string::npos);
  CHECK(f.call("PUT", "/restorePointCollections/c/restorePoints/rp1",
               json{{"properties", {{"consistencyMode", "Sometimes"}}}})
            .status == 400);
  CHECK(f.call("PUT", "/restorePointCollections/c/restorePoints/rp1",
               json{{"properties", {{"timeCreated", "now"}}}})
            .status == 400);

  json rp_body = {{"properties", {{"excludeDisks", {{{"id", "/disks/tmp"}}}}}}};
  auto r = f.call("PUT", "/restorePointCollections/c/restorePoints/rp1", rp_body);
  REQUIRE(r.status == 201);
  CHECK(Body(r)["type"] == "rpoint/restorePoints");
  json op = WaitDone(f, r);
  CHECK(op["status"] == "Succeeded");
  CHECK(op["properties"]["kind"] == "CreateRestorePoint");
  CHECK(f.call("PUT", "/restorePointCollections/c/restorePoints/rp1", rp_body).status == 200);

  json rp = Body(f.call("GET", "/restorePointCollections/c/restorePoints/rp1?$expand=instanceView"));
  CHECK(rp["properties"]["provisioningState"] == "Succeeded");
  CHECK(rp["properties"]["sourceMetadata"]["vmId"] == "/vms/vm1");
  CHECK(rp["properties"]["sourceMetadata"]["configuration"]["cpus"] == 2);
  REQUIRE(rp["properties"]["sourceMetadata"]["storageProfile"]["disks"].size() == 1);
  CHECK(rp["properties"]["instanceView"]["diskRestorePoints"].size() == 1);
  CHECK(!Body(f.call("GET", "/restorePointCollections/c/restorePoints/rp1"))["properties"].contains(
      "instanceView"));
  CHECK(f.call("GET", "/restorePointCollections/c/restorePoints/rp1?$expand=all").status == 400);
  CHECK(f.call("GET", "/restorePointCollections/c/restorePoints/rp1?expand=x").status == 400);
  json c = Body(f.call("GET", "/restorePointCollections/c?$expand=restorePoints"));
  CHECK(c["properties"]["restorePoints"].size() == 1);
  json drp = Body(f.call("GET", "/restorePointCollections/c/restorePoints/rp1/diskRestorePoints/a"));
  CHECK(drp["properties"]["export"]["nbd"]["name"] == "c/rp1/a");
  CHECK(drp["properties"]["incremental"] == false);

  // Restore a disk: 201 Creating (not exported), then Succeeded.
  std::string src = "/restorePointCollections/c/restorePoints/rp1/diskRestorePoints/a";
  json restore = {{"properties", {{"creationData", {{"createOption", "Restore"}, {"sourceResourceId", src}}}}}};
  auto d = f.call("PUT", "/disks/r1", restore);
  REQUIRE(d.status == 201);
  CHECK(Body(d)["properties"]["creationData"]["sourceResourceId"] == src);
  CHECK(WaitDone(f, d)["status"] == "Succeeded");
  json r1 = Body(f.call("GET", "/disks/r1"));
  CHECK(r1["properties"]["provisioningState"] == "Succeeded");
  CHECK(r1["properties"]["export"]["nbd"]["name"] == "r1");
  CHECK(f.call("PUT", "/disks/r1", restore).status == 200);
  json with_size = restore;
  with_size["properties"]["sizeBytes"] = kMiB;
  CHECK(f.call("PUT", "/disks/r2", with_size).status == 400);
  json other = restore;
  other["properties"]["creationData"]["sourceResourceId"] = src + "x";
  CHECK(f.call("PUT", "/disks/r2", other).status == 404);

  // Actions: strict bodies, 202 + headers.
  CHECK(f.call("POST", "/restorePointCollections/c/restorePoints/rp1/verify", json{{"deep", true}})
            .status == 400);
  auto v = f.call("POST", "/restorePointCollections/c/restorePoints/rp1/verify");
  REQUIRE(v.status == 202);
  json vop = WaitDone(f, v);
  CHECK(vop["properties"]["output"]["ok"] == true);
  CHECK(f.call("POST", "/restorePointCollections/c/restorePoints/rp1/restore", json{{"vm", "x"}})
            .status == 400);
  CHECK(f.call("POST", "/restorePointCollections/c/restorePoints/rp1/restore", json{{"vmName", "vm1"}})
            .status == 409);
  CHECK(f.call("GET", "/operations/not-an-id!").status == 404);

  CHECK(f.call("DELETE", "/restorePointCollections/c/restorePoints/rp1").status == 204);
  CHECK(f.call("DELETE", "/restorePointCollections/c").status == 204);
}

TEST_CASE("trackingGranularityBytes is set at PUT only") {
  Fixture f;
  json body = Create(kMiB);
  body["properties"]["trackingGranularityBytes"] = 4096;
  auto r = f.call("PUT", "/disks/g", body);
  REQUIRE(r.status == 201);
  CHECK(Body(r)["properties"]["trackingGranularityBytes"] == 4096);
  CHECK(f.call("PUT", "/disks/g", body).status == 200);
  body["properties"]["trackingGranularityBytes"] = 8192;
  CHECK(f.call("PUT", "/disks/g", body).status == 409);
  body["properties"]["trackingGranularityBytes"] = 3000;
  CHECK(f.call("PUT", "/disks/h", body).status == 400);
  auto p = f.call("PATCH", "/disks/g", json{{"properties", {{"trackingGranularityBytes", 8192}}}});
  CHECK(p.status == 400);
  CHECK(Message(p).find("cannot be changed") != std::string::npos);
}

TEST_CASE("JSON limits: deep, duplicate and oversized values are 400, never a crash") {
  Fixture f;
  auto inf = f.call("PUT", "/disks/a", std::string(R"({"properties": {"sizeBytes": 1e400}})"));
  CHECK(inf.status == 400);
  CHECK(ErrCode(inf) == "InvalidJson");
  REQUIRE(f.call("PUT", "/disks/a", Create(kMiB)).status == 201);

  auto vm = [](const std::string& configuration) {
    return R"({"properties": {"disks": [{"id": "/disks/a"}], "configuration": )" + configuration +
           "}}";
  };
  // 10,000 levels: once a 200 MB answer, and a crash of every later GET /vms.
  auto deep = f.call("PUT", "/vms/v", vm(std::string(10000, '[') + std::string(10000, ']')));
  CHECK(deep.status == 400);
  CHECK(Message(deep).find("nested deeper than 64") != std::string::npos);
  auto dup = f.call("PUT", "/vms/v", vm(R"({"cpu": 1, "cpu": 2})"));
  CHECK(dup.status == 400);
  CHECK(Message(dup).find("duplicate key 'cpu'") != std::string::npos);
  // The configuration is opaque: a number no double holds is kept as sent.
  const std::string serial = R"({"serial": 123456789012345678901234567890})";
  auto big = f.call("PUT", "/vms/v", vm(serial));
  CHECK(big.status == 201);
  CHECK(f.call("GET", "/vms/v").body.find("\"configuration\": " + serial) != std::string::npos);

  // The deepest configuration accepted (62 levels inside the 2-level envelope)
  // is stored, read back and listed.
  std::string cfg = std::string(61, '[') + "{\"x\": 18446744073709551615}" + std::string(61, ']');
  REQUIRE(f.call("PUT", "/vms/v", vm(cfg)).status == 200);
  auto list = f.call("GET", "/vms");
  REQUIRE(list.status == 200);
  json got = Body(list)["value"][0]["properties"]["configuration"];
  CHECK(got == json::parse(cfg));
  CHECK(f.call("GET", "/vms/v").status == 200);
}
