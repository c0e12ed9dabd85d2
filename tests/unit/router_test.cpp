// Router, request-target parsing and API versions (control/router.h, url.h, api_version.h).
#include <doctest/doctest.h>

#include "common/json_raw.h"
#include "control/api_version.h"
#include "control/router.h"
#include "control/url.h"

using namespace rpoint;

TEST_CASE("ParseTarget splits and decodes segments after splitting") {
  auto t = ParseTarget("/disks/a%2Fb?api-version=2026-11-01&force=true");
  REQUIRE(t.ok());
  CHECK(t->path == "/disks/a%2Fb");
  REQUIRE(t->segments.size() == 2);
  CHECK(t->segments[0] == "disks");
  CHECK(t->segments[1] == "a/b");  // stays one segment
  REQUIRE(t->query_param("force") != nullptr);
  CHECK(*t->query_param("force") == "true");
  CHECK(*t->query_param("api-version") == "2026-11-01");
  CHECK(t->query_param("nope") == nullptr);
}

TEST_CASE("ParseTarget edge cases") {
  CHECK(ParseTarget("/")->segments.empty());
  CHECK(ParseTarget("/disks/")->segments.size() == 2);
  CHECK(ParseTarget("/disks/")->segments[1].empty());
  CHECK(ParseTarget("/a?")->query.empty());
  CHECK(ParseTarget("/a?x")->query.at(0).second.empty());
  CHECK(*ParseTarget("/a?q=a+b%20c")->query_param("q") == "a b c");
  CHECK(ParseTarget("/a+b")->segments[0] == "a+b");  // '+' is literal in paths
  CHECK_FALSE(ParseTarget("").ok());
  CHECK_FALSE(ParseTarget("disks").ok());
  CHECK_FALSE(ParseTarget("http://localhost/disks").ok());
  CHECK_FALSE(ParseTarget("/a#frag").ok());
  CHECK_FALSE(ParseTarget("/a%2").ok());
  CHECK_FALSE(ParseTarget("/a%zz").ok());
  CHECK_FALSE(ParseTarget("/a%00b").ok());
  CHECK_FALSE(ParseTarget("/a?x=1&x=2").ok());
}

TEST_CASE("api-version: omitted means latest, unknown is refused with the list") {
  CHECK(ResolveApiVersion(nullptr).value() == LatestApiVersion());
  std::string v = "2026-11-01";
  CHECK(ResolveApiVersion(&v).value() == "2026-11-01");
  std::string bad = "2020-01-01";
  auto r = ResolveApiVersion(&bad);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().message().find("2026-11-01") != std::string::npos);
  CHECK(r.status().message().find("2020-01-01") != std::string::npos);
}

namespace {

Router MakeRouter() {
  Router r;
  r.add("GET", "/", [](const RequestContext&) { return JsonResponse(200, {{"root", true}}); });
  r.add("GET", "/things/{name}", [](const RequestContext& c) {
    return JsonResponse(200, {{"name", c.params.at(0)}, {"v", c.api_version}});
  });
  r.add("DELETE", "/things/{name}", [](const RequestContext&) { return EmptyResponse(204); },
        {"force"});
  r.add("PUT", "/things/{name}", [](const RequestContext& c) {
    nlohmann::json body;
    HttpResponse err;
    if (!ParseJsonObjectBody(c.request, &body, &err)) return err;
    return JsonResponse(201, body);
  });
  r.add("GET", "/boom", [](const RequestContext&) -> HttpResponse {
    throw std::runtime_error("kaboom");
  });
  return r;
}

HttpResponse Do(const Router& r, std::string method, std::string target, std::string body = "",
                std::string content_type = "") {
  return r.dispatch({std::move(method), std::move(target), std::move(content_type), std::move(body)});
}

std::string ErrCode(const HttpResponse& r) {
  return nlohmann::json::parse(r.body).at("error").at("code").get<std::string>();
}

}  // namespace

TEST_CASE("Router dispatches with params and api-version") {
  Router r = MakeRouter();
  auto res = Do(r, "GET", "/things/x%20y");
  CHECK(res.status == 200);
  auto j = nlohmann::json::parse(res.body);
  CHECK(j["name"] == "x y");
  CHECK(j["v"] == LatestApiVersion());
  CHECK(Do(r, "GET", "/").status == 200);
  CHECK(Do(r, "GET", "/?api-version=2026-11-01").status == 200);
}

TEST_CASE("Router protocol errors") {
  Router r = MakeRouter();
  auto nf = Do(r, "GET", "/nope");
  CHECK(nf.status == 404);
  CHECK(ErrCode(nf) == "RouteNotFound");
  CHECK(Do(r, "GET", "/things").status == 404);
  CHECK(Do(r, "GET", "/things/").status == 404);  // empty parameter
  CHECK(Do(r, "GET", "/things/a/b").status == 404);

  auto na = Do(r, "POST", "/things/a");
  CHECK(na.status == 405);
  CHECK(ErrCode(na) == "MethodNotAllowed");
  REQUIRE(na.header("Allow") != nullptr);
  CHECK(*na.header("allow") == "GET, DELETE, PUT");

  auto bv = Do(r, "GET", "/things/a?api-version=1999-01-01");
  CHECK(bv.status == 400);
  CHECK(ErrCode(bv) == "InvalidApiVersion");

  auto bq = Do(r, "GET", "/things/a?force=true");
  CHECK(bq.status == 400);
  CHECK(ErrCode(bq) == "InvalidQueryParameter");
  CHECK(Do(r, "DELETE", "/things/a?force=true").status == 204);

  auto bu = Do(r, "GET", "/things/%zz");
  CHECK(bu.status == 400);
  CHECK(ErrCode(bu) == "InvalidUrl");

  auto boom = Do(r, "GET", "/boom");
  CHECK(boom.status == 500);
  CHECK(ErrCode(boom) == "Internal");
}

TEST_CASE("JSON bodies: media type, syntax, shape") {
  Router r = MakeRouter();
  CHECK(Do(r, "PUT", "/things/a", R"({"a":1})").status == 201);
  CHECK(Do(r, "PUT", "/things/a", R"({"a":1})", "application/json").status == 201);
  CHECK(Do(r, "PUT", "/things/a", R"({"a":1})", "Application/JSON; charset=utf-8").status == 201);
  // curl -d without -H: a JSON object labelled as a form is taken as JSON...
  CHECK(Do(r, "PUT", "/things/a", R"({"a":1})", "application/x-www-form-urlencoded").status == 201);
  // ...a real form body is not, and other types never are.
  auto form = Do(r, "PUT", "/things/a", "a=1&b=2", "application/x-www-form-urlencoded");
  CHECK(form.status == 415);
  CHECK(ErrCode(form) == "UnsupportedMediaType");
  auto mt = Do(r, "PUT", "/things/a", R"({"a":1})", "text/plain");
  CHECK(mt.status == 415);
  CHECK(ErrCode(mt) == "UnsupportedMediaType");
  auto bad = Do(r, "PUT", "/things/a", R"({"a":)");
  CHECK(bad.status == 400);
  CHECK(ErrCode(bad) == "InvalidJson");
  CHECK(ErrCode(Do(r, "PUT", "/things/a", "")) == "InvalidJson");
  CHECK(ErrCode(Do(r, "PUT", "/things/a", "[1,2]")) == "InvalidJson");
}

TEST_CASE("Status to HTTP status") {
  CHECK(HttpStatusFor(Code::kInvalidArgument) == 400);
  CHECK(HttpStatusFor(Code::kOutOfRange) == 400);
  CHECK(HttpStatusFor(Code::kNotFound) == 404);
  CHECK(HttpStatusFor(Code::kAlreadyExists) == 409);
  CHECK(HttpStatusFor(Code::kConflict) == 409);
  CHECK(HttpStatusFor(Code::kNoSpace) == 507);
  CHECK(HttpStatusFor(Code::kShutdown) == 503);
  CHECK(HttpStatusFor(Code::kInternal) == 500);
  auto e = ErrorResponse(Status::Conflict("busy"));
  CHECK(e.status == 409);
  auto j = nlohmann::json::parse(e.body);
  CHECK(j["error"]["code"] == "Conflict");
  CHECK(j["error"]["message"] == "busy");
}

TEST_CASE("JSON bodies: nesting depth is bounded at parse time") {
  Router r = MakeRouter();
  auto nest = [](size_t depth) {
    return "{\"a\":" + std::string(depth - 1, '[') + std::string(depth - 1, ']') + "}";
  };
  CHECK(Do(r, "PUT", "/things/a", nest(64)).status == 201);
  auto deep = Do(r, "PUT", "/things/a", nest(65));
  CHECK(deep.status == 400);
  CHECK(ErrCode(deep) == "InvalidJson");
  CHECK(deep.body.find("nested deeper than 64") != std::string::npos);
  // 50,000 levels (100 KB, well under the body limit) used to overflow the
  // stack when the parsed document was copied or printed.
  auto huge = Do(r, "PUT", "/things/a", "{\"a\":" + std::string(50000, '['));
  CHECK(huge.status == 400);
  CHECK(huge.body.find("nested deeper than 64") != std::string::npos);
  CHECK(huge.body.size() < 1000);
}

TEST_CASE("JSON bodies: duplicate keys and numbers that do not fit are 400") {
  Router r = MakeRouter();
  auto dup = Do(r, "PUT", "/things/a", R"({"a": 1, "b": {"k": 1, "k": 2}})");
  CHECK(dup.status == 400);
  CHECK(ErrCode(dup) == "InvalidJson");
  CHECK(dup.body.find("duplicate key 'k'") != std::string::npos);
  CHECK(Do(r, "PUT", "/things/a", R"({"a": 1, "a": 1})").status == 400);
  // Same key in different objects is fine.
  CHECK(Do(r, "PUT", "/things/a", R"({"a": {"k": 1}, "b": {"k": 1}})").status == 201);

  auto inf = Do(r, "PUT", "/things/a", R"({"sizeBytes": 1e400})");
  CHECK(inf.status == 400);
  CHECK(ErrCode(inf) == "InvalidJson");
  CHECK(inf.body.find("1e400") != std::string::npos);
  auto big = Do(r, "PUT", "/things/a", R"({"n": 123456789012345678901234567890})");
  CHECK(big.status == 400);
  CHECK(big.body.find("64-bit") != std::string::npos);
  // The extremes of the 64-bit range are kept exactly.
  auto ok = Do(r, "PUT", "/things/a", R"({"u": 18446744073709551615, "i": -9223372036854775808})");
  REQUIRE(ok.status == 201);
  CHECK(ok.body.find("18446744073709551615") != std::string::npos);
  CHECK(ok.body.find("-9223372036854775808") != std::string::npos);
}

TEST_CASE("JSON answers are indented only while small") {
  nlohmann::ordered_json small = {{"a", {1, 2}}};
  CHECK(JsonResponse(200, small).body.find("\n  ") != std::string::npos);
  // 60 levels of nesting around 40,000 numbers: indented it would be ~5 MB.
  nlohmann::ordered_json big = nlohmann::ordered_json::array();
  for (int i = 0; i < 40000; ++i) big.push_back(i % 10);
  for (int i = 0; i < 60; ++i) big = nlohmann::ordered_json::array({big});
  auto r = JsonResponse(200, big);
  CHECK(r.body.size() < 100000);
  CHECK(nlohmann::ordered_json::parse(r.body) == big);
}

TEST_CASE("ParseJsonKeepingRaw keeps one member's exact text and DumpJson splices it back") {
  const std::string cfg =
      R"({"z": 18446744073709551617, "a": [1e400, 0.10000000000000000555, "\u00e9"]})";
  const std::string body = R"({"properties": {"disks": [], "configuration": )" + cfg + "}}";
  auto j = ParseJsonKeepingRaw(body, {"properties", "configuration"});
  REQUIRE(j.ok());
  const nlohmann::json& c = (*j)["properties"]["configuration"];
  CHECK(c.is_binary());
  CHECK(RawJsonText(c) == cfg);
  CHECK(DumpJson(*j) == R"({"properties":{"configuration":)" + cfg + R"(,"disks":[]}})");
  nlohmann::ordered_json o = {{"configuration", nlohmann::ordered_json(c)}, {"n", 1}};
  CHECK(DumpJson(o, 2) == "{\n  \"configuration\": " + cfg + ",\n  \"n\": 1\n}");
  // Even text a dump would print the same stays raw (no indenting inside it).
  auto plain = ParseJsonKeepingRaw(R"({"configuration":{"cpus":2}})", {"configuration"});
  REQUIRE(plain.ok());
  CHECK(DumpJson(*plain, 2) == "{\n  \"configuration\": {\"cpus\":2}\n}");
  CHECK(RawJsonText(nlohmann::json{{"cpus", 2}}) == R"({"cpus":2})");
  // The whole document (an empty path), as stored in SQLite.
  auto whole = ParseJsonKeepingRaw(" [1e400] ", {});
  REQUIRE(whole.ok());
  CHECK(RawJsonText(*whole) == "[1e400]");
  // Outside the member, and for anything but a number's range, it is as strict as ParseJson.
  CHECK(!ParseJsonKeepingRaw(R"({"a": 1e400, "c": 1})", {"c"}).ok());
  for (const char* bad : {"[1,]", "01", "1.", "[1e400x]", R"({"a":1,"a":2})", "-", "--1",
                          "1e5.3", "1-2", "+1", ".5"}) {
    CHECK_MESSAGE(!ParseJsonKeepingRaw(std::string(R"({"c": )") + bad + "}", {"c"}).ok(), bad);
  }
  CHECK(!ParseJsonKeepingRaw(R"({"c": )" + std::string(70, '[') + std::string(70, ']') + "}", {"c"})
             .ok());
}
