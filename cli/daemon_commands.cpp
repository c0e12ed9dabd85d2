// rpoint daemon status.
#include <ostream>

#include "cli/command.h"
#include "cli/table.h"

namespace rpoint::cli {

namespace {

using json = nlohmann::ordered_json;

int Status(Context& ctx, const po::variables_map&) {
  HttpReply root, health;
  int rc;
  if (!Call(ctx, "GET", "/", std::nullopt, &root, &rc)) return rc;
  if (!Call(ctx, "GET", "/health", std::nullopt, &health, &rc)) return rc;
  json r = root.json.value_or(json::object());
  json h = health.json.value_or(json::object());
  if (ctx.output == OutputFormat::kJson) {
    json out = r;
    out["health"] = h;
    PrintJson(ctx, out);
    return kExitOk;
  }
  std::string versions;
  for (const auto& v : r.value("apiVersions", json::array())) {
    versions += (versions.empty() ? "" : ", ") + v.get<std::string>();
  }
  PrintFields(ctx.out,
              {{"Daemon", r.value("name", std::string("?")) + " " + r.value("version", std::string("?"))},
               {"Socket", ctx.client.socket_path()},
               {"API versions", versions},
               {"Health", h.value("status", std::string("?")) + " (" +
                              std::to_string(h.value("disks", 0)) + " disks, " +
                              std::to_string(h.value("unavailableDisks", 0)) + " unavailable)"}});
  return kExitOk;
}

}  // namespace

void AddDaemonCommands(std::vector<Command>& table) {
  table.push_back({"daemon", "status", "", "show the daemon's version, API versions and health",
                   [](po::options_description&, po::options_description&,
                      po::positional_options_description&) {},
                   Status});
}

}  // namespace rpoint::cli
