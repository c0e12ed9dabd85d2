// rpoint operation show, and --wait: polling a long-running operation.
#include <unistd.h>

#include <chrono>
#include <ostream>
#include <thread>

#include "cli/command.h"
#include "cli/table.h"

namespace rpoint::cli {

using json = nlohmann::ordered_json;

namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(500);
constexpr int kBarWidth = 30;

int Percent(const json& op) {
  auto it = op.find("percentComplete");
  if (it == op.end() || !it->is_number()) return 0;
  int p = it->get<int>();
  return p < 0 ? 0 : p > 100 ? 100 : p;
}

// "\r[#########.....]  45% label": redrawn in place on a terminal.
void DrawBar(std::ostream& err, const std::string& label, int percent) {
  int filled = percent * kBarWidth / 100;
  err << "\r[" << std::string(filled, '#') << std::string(kBarWidth - filled, '.') << "] "
      << (percent < 10    ? "  "
          : percent < 100 ? " "
                          : "")
      << percent << "% " << label << std::flush;
}

void PrintOperation(Context& ctx, const json& op) {
  if (ctx.output == OutputFormat::kJson) return PrintJson(ctx, op);
  const json& p = Props(op);
  std::vector<std::pair<std::string, std::string>> f = {
      {"Operation", Str(op, "name")},
      {"Kind", Str(p, "kind")},
      {"Resource", Str(p, "resourceId")},
      {"Status", Str(op, "status")},
      {"Progress", std::to_string(Percent(op)) + "%"},
      {"Started", Str(op, "startTime")},
      {"Ended", Str(op, "endTime")},
  };
  if (op.contains("error")) {
    f.emplace_back("Error", Str(op["error"], "message") + " (" + Str(op["error"], "code") + ")");
  }
  if (p.contains("output")) f.emplace_back("Output", p["output"].dump());
  PrintFields(ctx.out, f);
}

int Show(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  std::string id = vm["name"].as<std::string>();
  // Accept the header's form too: "/operations/ID".
  if (auto slash = id.rfind('/'); slash != std::string::npos) id = id.substr(slash + 1);
  if (!Call(ctx, "GET", "/operations/" + Escape(id), std::nullopt, &r, &rc)) return rc;
  if (r.json) PrintOperation(ctx, *r.json);
  return kExitOk;
}

int List(Context& ctx, const po::variables_map&) {
  return ListResources(ctx, "/operations", "no operations",
                       {"OPERATION", "KIND", "STATUS", "PROGRESS", "STARTED", "RESOURCE"},
                       [](const json& op) -> std::vector<std::string> {
                         const json& p = Props(op);
                         return {Str(op, "name"),      Str(p, "kind"),
                                 Str(op, "status"),    std::to_string(Percent(op)) + "%",
                                 Str(op, "startTime"), Str(p, "resourceId")};
                       });
}

}  // namespace

std::string OperationIdOf(const HttpReply& reply) {
  const std::string* h = reply.header("Azure-AsyncOperation");
  if (h == nullptr) h = reply.header("Location");
  if (h == nullptr) return "";
  std::string path = h->substr(0, h->find('?'));
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

void PrintOperationHint(Context& ctx, const std::string& id) {
  ctx.err << "operation " << id << " started (follow it with: rpoint operation show " << id
          << ")\n";
}

int WaitForOperation(Context& ctx, const std::string& id, const std::string& label,
                     json* operation) {
  int last_step = -1;
  std::string last_status;
  for (;;) {
    HttpReply r;
    int rc;
    if (!Call(ctx, "GET", "/operations/" + Escape(id), std::nullopt, &r, &rc)) {
      if (ctx.err_is_tty) ctx.err << '\n';
      return rc;
    }
    json op = r.json.value_or(json::object());
    std::string status = Str(op, "status");
    int percent = Percent(op);
    if (ctx.err_is_tty) {
      DrawBar(ctx.err, label, status == "Succeeded" ? 100 : percent);
    } else if (percent / 10 != last_step || status != last_status) {
      // A log or a pipe gets a line per 10% and per status change, not a bar.
      ctx.err << label << ": " << status << ' ' << percent << "%\n";
    }
    last_step = percent / 10;
    last_status = status;
    if (status != "InProgress") {
      if (ctx.err_is_tty) ctx.err << '\n';
      *operation = op;
      if (status == "Succeeded") return kExitOk;
      std::string message = op.contains("error") ? Str(op["error"], "message") : "";
      std::string code = op.contains("error") ? Str(op["error"], "code") : "";
      ctx.err << "rpoint: operation " << id << " " << (status.empty() ? "ended" : status)
              << (message.empty() ? "" : ": " + message) << (code.empty() ? "" : " (" + code + ")")
              << '\n';
      if (ctx.output == OutputFormat::kJson) PrintJson(ctx, op);
      return kExitServerError;
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

int WaitForProvisioning(Context& ctx, const std::string& path, const std::string& label,
                        json* resource) {
  bool said = false;
  for (;;) {
    HttpReply r;
    int rc;
    if (!Call(ctx, "GET", path, std::nullopt, &r, &rc)) {
      if (r.status == 404) ctx.err << "rpoint: " << label << " failed (it is gone)\n";
      return rc;
    }
    json res = r.json.value_or(json::object());
    const json& props = Props(res);
    std::string state = Str(props, "provisioningState");
    if (state == "Creating") {
      if (!said) ctx.err << label << ": already under way; waiting\n";
      said = true;
      std::this_thread::sleep_for(kPollInterval);
      continue;
    }
    *resource = res;
    if (state == "Succeeded" || state.empty()) return kExitOk;
    std::string message = props.contains("error") ? Str(props["error"], "message") : "";
    std::string code = props.contains("error") ? Str(props["error"], "code") : "";
    ctx.err << "rpoint: " << label << " " << state << (message.empty() ? "" : ": " + message)
            << (code.empty() ? "" : " (" + code + ")") << '\n';
    if (ctx.output == OutputFormat::kJson) PrintJson(ctx, res);
    return kExitServerError;
  }
}

void AddOperationCommands(std::vector<Command>& table) {
  table.push_back({"operation", "show", "ID",
                   "show a long-running operation (restore point creation, restore, verify)",
                   [](po::options_description&, po::options_description& h,
                      po::positional_options_description& p) {
                     h.add_options()("name", po::value<std::string>()->required(), "operation id");
                     p.add("name", 1);
                   },
                   Show});
  table.push_back({"operation", "list", "",
                   "list recent operations, newest first (ended ones are kept for "
                   "operations.retention_seconds)",
                   [](po::options_description&, po::options_description&,
                      po::positional_options_description&) {},
                   List});
}

}  // namespace rpoint::cli
