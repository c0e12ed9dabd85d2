// rpoint access grant|revoke: time-limited NBD access to a disk restore point
// (beginGetAccess / endGetAccess, docs/api.md "Access grants").
#include <cctype>
#include <ostream>

#include "cli/command.h"
#include "cli/nbd_client_args.h"

namespace rpoint::cli {

namespace {

using json = nlohmann::ordered_json;

// "90", "90s", "15m", "1h", "7d" -> seconds; false when malformed or 0.
bool ParseDuration(const std::string& s, uint64_t* out) {
  if (s.empty() || !std::isdigit(static_cast<unsigned char>(s[0]))) return false;
  size_t i = 0;
  uint64_t n = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
    if (n > (UINT64_MAX - 9) / 10) return false;
    n = n * 10 + static_cast<uint64_t>(s[i++] - '0');
  }
  std::string unit = s.substr(i);
  uint64_t mul = 0;
  if (unit.empty() || unit == "s")
    mul = 1;
  else if (unit == "m")
    mul = 60;
  else if (unit == "h")
    mul = 3600;
  else if (unit == "d")
    mul = 86400;
  else
    return false;
  if (n == 0 || n > UINT64_MAX / mul) return false;
  *out = n * mul;
  return true;
}

bool DiskPointArg(Context& ctx, const po::variables_map& vm, std::vector<std::string>* parts,
                  int* rc) {
  std::string s = vm["name"].as<std::string>();
  if (SplitNames(s, 3, parts)) return true;
  *rc = UsageError(ctx, "expected COLLECTION/RESTORE_POINT/DISK, got '" + s + "'");
  return false;
}

std::string DiskPointPath(const std::vector<std::string>& p) {
  return RestorePointPath(p[0], p[1]) + "/diskRestorePoints/" + Escape(p[2]);
}

int AccessGrant(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> p;
  int rc;
  if (!DiskPointArg(ctx, vm, &p, &rc)) return rc;
  uint64_t seconds = 0;
  const std::string d = vm["duration"].as<std::string>();
  if (!ParseDuration(d, &seconds)) {
    return UsageError(ctx,
                      "--duration: expected a positive number of seconds, or with s, m, h "
                      "or d (90, 15m, 1h, 7d), got '" +
                          d + "'");
  }
  json body = {{"access", "Read"}, {"durationInSeconds", seconds}};
  if (vm.count("listener")) body["listener"] = vm["listener"].as<std::string>();
  HttpReply r;
  if (!Call(ctx, "POST", DiskPointPath(p) + "/beginGetAccess", body, &r, &rc)) return rc;
  json op = r.json.value_or(json::object());
  if (Str(op, "status") == "InProgress") {
    rc = WaitForOperation(ctx, OperationIdOf(r), "granting access", &op);
    if (rc != kExitOk) return rc;
  }
  if (ctx.output == OutputFormat::kJson) {
    PrintJson(ctx, op);
    return kExitOk;
  }
  const json output = Props(op).value("output", json::object());
  std::string uri = Str(output, "accessSAS");
  if (uri.empty()) {
    ctx.err << "rpoint: the daemon answered no accessSAS\n";
    return kExitServerError;
  }
  // The URI alone on stdout (scripts: URI=$(rpoint access grant ...)); when
  // it ends on stderr. --nbd-client: what nbd-client takes instead (it takes
  // no URI): nbd-client $(rpoint access grant ... --nbd-client) /dev/nbd0.
  if (vm.count("nbd-client")) {
    auto args = NbdClientArgs(uri);
    if (!args.ok()) {
      ctx.err << "rpoint: " << args.status().message() << "\n";
      return kExitServerError;
    }
    ctx.out << *args << "\n";
    if (args->find("-enable-tls") != std::string::npos) {
      ctx.err << "add -cacertfile CA (and -certfile CERT -keyfile KEY when the server asks for a "
                 "client certificate)\n";
    }
  } else {
    ctx.out << uri << "\n";
  }
  ctx.err << "valid until " << Str(output, "expiryTime") << "\n";
  return kExitOk;
}

int AccessRevoke(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> p;
  int rc;
  if (!DiskPointArg(ctx, vm, &p, &rc)) return rc;
  HttpReply r;
  if (!Call(ctx, "POST", DiskPointPath(p) + "/endGetAccess", json::object(), &r, &rc)) return rc;
  json j = r.json.value_or(json::object());
  if (ctx.output == OutputFormat::kJson) {
    PrintJson(ctx, j);
  } else {
    ctx.out << (j.value("revoked", false) ? "revoked" : "no active grant") << "\n";
  }
  return kExitOk;
}

void DeclareName(po::options_description&, po::options_description& h,
                 po::positional_options_description& p) {
  h.add_options()("name", po::value<std::string>()->required(), "name");
  p.add("name", 1);
}

}  // namespace

void AddAccessCommands(std::vector<Command>& table) {
  table.push_back(
      {"access", "grant",
       "COLLECTION/RESTORE_POINT/DISK --duration DURATION [--listener tcp|unix] [--nbd-client]",
       "grant time-limited read access to a disk restore point; prints its NBD URI",
       [](po::options_description& o, po::options_description& h,
          po::positional_options_description& p) {
         DeclareName(o, h, p);
         o.add_options()("duration", po::value<std::string>()->value_name("DURATION")->required(),
                         "how long: seconds, or 90s, 15m, 1h, 7d")(
             "listener", po::value<std::string>()->value_name("tcp|unix"),
             "which NBD listener the URI names (default: the daemon's access.listener)")(
             "nbd-client",
             "print nbd-client's arguments instead of the URI (-N TOKEN HOST PORT, or -N TOKEN "
             "-unix PATH; -enable-tls for a TLS listener)");
       },
       AccessGrant});
  table.push_back({"access", "revoke", "COLLECTION/RESTORE_POINT/DISK",
                   "end a disk restore point's access grant and cut its clients", DeclareName,
                   AccessRevoke});
}

}  // namespace rpoint::cli
