// rpoint collection create|list|show|delete, rpoint restore-point
// create|list|show|delete|verify, rpoint region list|repair|gc.
#include <ostream>

#include "cli/command.h"
#include "cli/size.h"
#include "cli/table.h"

namespace rpoint::cli {

namespace {

using json = nlohmann::ordered_json;

const json& Value(const HttpReply& r) {
  static const json kEmpty = json::array();
  if (!r.json || !r.json->is_object()) return kEmpty;
  auto it = r.json->find("value");
  return it != r.json->end() && it->is_array() ? *it : kEmpty;
}

std::string Arg(const po::variables_map& vm, const char* key) {
  return vm[key].as<std::string>();
}

void DeclareArg(po::options_description& hidden, po::positional_options_description& p,
                const char* key) {
  hidden.add_options()(key, po::value<std::string>()->required(), key);
  p.add(key, 1);
}

// "C/RP" from the positional "name"; a usage error otherwise.
bool PointArg(Context& ctx, const po::variables_map& vm, std::vector<std::string>* parts, int* rc) {
  std::string s = Arg(vm, "name");
  if (SplitNames(s, 2, parts)) return true;
  *rc = UsageError(ctx, "expected COLLECTION/RESTORE_POINT, got '" + s + "'");
  return false;
}

std::string Bytes(const json& props, const char* key) {
  auto it = props.find(key);
  if (it == props.end() || !it->is_number_unsigned()) return Str(props, key);
  return FormatSize(it->get<uint64_t>());
}

// ---- regions ----

int RegionList(Context& ctx, const po::variables_map&) {
  return ListResources(ctx, "/regions", nullptr, {"NAME", "DEFAULT", "STATE", "PATH"},
                       [](const json& g) -> std::vector<std::string> {
                         const json& p = Props(g);
                         return {Str(g, "name"), Str(p, "default") == "true" ? "yes" : "",
                                 Str(p, "state"), Str(p, "path")};
                       });
}

// region repair NAME / region gc NAME [--orphans]: synchronous, a JSON result.
void PrintRegionResult(Context& ctx, const json& r) {
  if (ctx.output == OutputFormat::kJson) return PrintJson(ctx, r);
  std::vector<std::pair<std::string, std::string>> fields;
  for (const auto& [k, v] : r.items()) {
    fields.emplace_back(k, v.is_string() ? v.get<std::string>() : v.dump());
  }
  PrintFields(ctx.out, fields);
}

int RegionRepair(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  std::string path = "/regions/" + Escape(Arg(vm, "name")) + "/repair";
  if (!Call(ctx, "POST", path, json::object(), &r, &rc)) return rc;
  PrintRegionResult(ctx, r.json.value_or(json::object()));
  return kExitOk;
}

int RegionGc(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  std::string path = "/regions/" + Escape(Arg(vm, "name")) + "/gc";
  if (vm.count("orphans")) path += "?orphans=true";
  if (!Call(ctx, "POST", path, json::object(), &r, &rc)) return rc;
  PrintRegionResult(ctx, r.json.value_or(json::object()));
  return kExitOk;
}

// ---- collections ----

void PrintCollection(Context& ctx, const json& c) {
  if (ctx.output == OutputFormat::kJson) return PrintJson(ctx, c);
  const json& p = Props(c);
  std::string vm = p.contains("source") ? Str(p["source"], "id") : "";
  if (vm.rfind("/vms/", 0) == 0) vm = vm.substr(5);
  PrintFields(ctx.out, {{"Name", Str(c, "name")},
                        {"VM", vm},
                        {"Region", Str(c, "location")},
                        {"Created", Str(p, "timeCreated")},
                        {"Provisioning", Str(p, "provisioningState")}});
  if (p.contains("restorePoints") && p["restorePoints"].is_array()) {
    ctx.out << '\n';
    if (p["restorePoints"].empty()) {
      ctx.out << "no restore points\n";
      return;
    }
    Table t({"RESTORE POINT", "STATE", "CONSISTENCY", "CREATED"});
    for (const json& rp : p["restorePoints"]) {
      const json& q = Props(rp);
      t.add({Str(rp, "name"), Str(q, "provisioningState"), Str(q, "consistencyMode"),
             Str(q, "timeCreated")});
    }
    t.print(ctx.out);
  }
}

int CollectionCreate(Context& ctx, const po::variables_map& vm) {
  json body = {{"properties", {{"source", {{"id", "/vms/" + Arg(vm, "vm")}}}}}};
  if (vm.count("region")) body["location"] = Arg(vm, "region");
  HttpReply r;
  int rc;
  if (!Call(ctx, "PUT", "/restorePointCollections/" + Escape(Arg(vm, "name")), body, &r, &rc)) {
    return rc;
  }
  if (r.json) PrintCollection(ctx, *r.json);
  return kExitOk;
}

int CollectionList(Context& ctx, const po::variables_map&) {
  return ListResources(ctx, "/restorePointCollections", "no restore point collections",
                       {"NAME", "VM", "REGION", "CREATED"},
                       [](const json& c) -> std::vector<std::string> {
                         const json& p = Props(c);
                         std::string vm = p.contains("source") ? Str(p["source"], "id") : "";
                         if (vm.rfind("/vms/", 0) == 0) vm = vm.substr(5);
                         return {Str(c, "name"), vm, Str(c, "location"), Str(p, "timeCreated")};
                       });
}

int CollectionShow(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  std::string path =
      "/restorePointCollections/" + Escape(Arg(vm, "name")) + "?$expand=restorePoints";
  if (!Call(ctx, "GET", path, std::nullopt, &r, &rc)) return rc;
  if (r.json) PrintCollection(ctx, *r.json);
  return kExitOk;
}

int CollectionDelete(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  if (!Call(ctx, "DELETE", "/restorePointCollections/" + Escape(Arg(vm, "name")), std::nullopt, &r,
            &rc)) {
    return rc;
  }
  if (ctx.output == OutputFormat::kTable) {
    ctx.out << "deleted collection '" << Arg(vm, "name") << "' and its restore points\n";
  }
  return kExitOk;
}

// ---- restore points ----

void PrintRestorePoint(Context& ctx, const json& rp, const json& disks) {
  if (ctx.output == OutputFormat::kJson) {
    json out = rp;
    if (!disks.empty()) out["diskRestorePoints"] = disks;
    return PrintJson(ctx, out);
  }
  const json& p = Props(rp);
  std::string excluded;
  if (p.contains("excludeDisks")) {
    for (const json& d : p["excludeDisks"]) {
      std::string id = Str(d, "id");
      excluded += (excluded.empty() ? "" : ", ") + id.substr(id.rfind('/') + 1);
    }
  }
  std::vector<std::pair<std::string, std::string>> f = {
      {"Name", Str(rp, "name")},
      {"VM", p.contains("sourceMetadata") ? Str(p["sourceMetadata"], "vmName") : ""},
      {"State", Str(p, "provisioningState")},
      {"Consistency", Str(p, "consistencyMode")},
      {"Created", Str(p, "timeCreated")},
      {"Excluded disks", excluded},
  };
  if (p.contains("instanceView") && p["instanceView"].contains("cutPauseMicroseconds")) {
    f.emplace_back("Cut pause", Str(p["instanceView"], "cutPauseMicroseconds") + " µs");
  }
  if (p.contains("error")) {
    f.emplace_back("Error", Str(p["error"], "message") + " (" + Str(p["error"], "code") + ")");
  }
  PrintFields(ctx.out, f);
  if (!disks.empty()) {
    ctx.out << '\n';
    Table t({"DISK", "SIZE", "TYPE", "STORED", "STATUS", "NBD EXPORT"});
    for (const json& d : disks) {
      const json& q = Props(d);
      std::string status = q.contains("replicationStatus")
                               ? Str(q["replicationStatus"], "status") + " " +
                                     Str(q["replicationStatus"], "completionPercent") + "%"
                               : "";
      std::string nbd = q.contains("export") && q["export"].contains("nbd")
                            ? Str(q["export"]["nbd"], "name")
                            : "";
      t.add({Str(d, "name"), Bytes(q, "sizeBytes"),
             Str(q, "incremental") == "true" ? "incremental" : "full", Bytes(q, "bytesStored"),
             status, nbd});
    }
    t.print(ctx.out);
  }
}

// GET the point (with its instance view) and its disk restore points, and print them.
int ShowPoint(Context& ctx, const std::string& c, const std::string& rp) {
  HttpReply r, d;
  int rc;
  if (!Call(ctx, "GET", RestorePointPath(c, rp) + "?$expand=instanceView", std::nullopt, &r, &rc)) {
    return rc;
  }
  if (!Call(ctx, "GET", RestorePointPath(c, rp) + "/diskRestorePoints", std::nullopt, &d, &rc)) {
    return rc;
  }
  PrintRestorePoint(ctx, r.json.value_or(json::object()), Value(d));
  return kExitOk;
}

int PointCreate(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> pt;
  int rc;
  if (!PointArg(ctx, vm, &pt, &rc)) return rc;
  json props = json::object();
  if (vm.count("exclude-disk")) {
    json ex = json::array();
    for (const std::string& d : vm["exclude-disk"].as<std::vector<std::string>>()) {
      ex.push_back({{"id", "/disks/" + d}});
    }
    props["excludeDisks"] = std::move(ex);
  }
  if (vm.count("consistency")) {
    std::string c = Arg(vm, "consistency");
    if (c == "fs" || c == "FileSystemConsistent") {
      props["consistencyMode"] = "FileSystemConsistent";
    } else if (c == "crash" || c == "CrashConsistent") {
      props["consistencyMode"] = "CrashConsistent";
    } else {
      return UsageError(ctx, "--consistency must be fs or crash, got '" + c + "'");
    }
  }
  HttpReply r;
  if (!Call(ctx, "PUT", RestorePointPath(pt[0], pt[1]), json{{"properties", props}}, &r, &rc)) {
    return rc;
  }
  std::string op = OperationIdOf(r);
  const std::string label = "restore point " + pt[0] + "/" + pt[1];
  if (op.empty() && vm.count("wait")) {
    // It already existed (a rerun): wait for it as for a new one.
    json point;
    rc = WaitForProvisioning(ctx, RestorePointPath(pt[0], pt[1]), label, &point);
    if (rc != kExitOk) return rc;
    return ShowPoint(ctx, pt[0], pt[1]);
  }
  if (op.empty() || !vm.count("wait")) {
    if (r.json) PrintRestorePoint(ctx, *r.json, json::array());
    if (!op.empty()) PrintOperationHint(ctx, op);
    return kExitOk;
  }
  json done;
  rc = WaitForOperation(ctx, op, label, &done);
  if (rc != kExitOk) return rc;
  return ShowPoint(ctx, pt[0], pt[1]);
}

// restore-point copy SRC_COLL/RP DST_COLL[/NAME]: the copy keeps the
// source's name unless one is given.
int PointCopy(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> src;
  int rc;
  if (!PointArg(ctx, vm, &src, &rc)) return rc;
  std::string to = Arg(vm, "to");
  std::vector<std::string> dst;
  if (!SplitNames(to, 2, &dst)) {
    if (to.empty() || to.find('/') != std::string::npos) {
      return UsageError(ctx, "expected COLLECTION or COLLECTION/RESTORE_POINT, got '" + to + "'");
    }
    dst = {to, src[1]};
  }
  json body = {{"properties",
                {{"sourceRestorePoint",
                  {{"id", "/restorePointCollections/" + src[0] + "/restorePoints/" + src[1]}}}}}};
  HttpReply r;
  if (!Call(ctx, "PUT", RestorePointPath(dst[0], dst[1]), body, &r, &rc)) return rc;
  std::string op = OperationIdOf(r);
  const std::string label = "copying " + src[0] + "/" + src[1] + " to " + dst[0] + "/" + dst[1];
  if (op.empty() && vm.count("wait")) {
    // The copy already existed (a rerun): wait for it as for a new one.
    json point;
    rc = WaitForProvisioning(ctx, RestorePointPath(dst[0], dst[1]), label, &point);
    if (rc != kExitOk) return rc;
    return ShowPoint(ctx, dst[0], dst[1]);
  }
  if (op.empty() || !vm.count("wait")) {
    if (r.json) PrintRestorePoint(ctx, *r.json, json::array());
    if (!op.empty()) PrintOperationHint(ctx, op);
    return kExitOk;
  }
  json done;
  rc = WaitForOperation(ctx, op, label, &done);
  if (rc != kExitOk) return rc;
  json output = Props(done).value("output", json::object());
  if (ctx.output == OutputFormat::kTable) {
    ctx.out << "moved " << FormatSize(output.value("bytesMoved", uint64_t{0})) << " ("
            << Str(output, "chunksMoved") << " chunks; " << Str(output, "chunksReused")
            << " already in the target region)\n\n";
  }
  return ShowPoint(ctx, dst[0], dst[1]);
}

int PointList(Context& ctx, const po::variables_map& vm) {
  std::string path = "/restorePointCollections/" + Escape(Arg(vm, "name")) + "/restorePoints";
  return ListResources(
      ctx, path, "no restore points", {"NAME", "STATE", "CONSISTENCY", "DISKS", "CREATED"},
      [](const json& rp) -> std::vector<std::string> {
        const json& p = Props(rp);
        std::string disks;
        if (p.contains("sourceMetadata") && p["sourceMetadata"].contains("storageProfile")) {
          for (const json& d :
               p["sourceMetadata"]["storageProfile"].value("disks", json::array())) {
            disks += (disks.empty() ? "" : ", ") + Str(d, "name");
          }
        }
        return {Str(rp, "name"), Str(p, "provisioningState"), Str(p, "consistencyMode"), disks,
                Str(p, "timeCreated")};
      });
}

int PointShow(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> pt;
  int rc;
  if (!PointArg(ctx, vm, &pt, &rc)) return rc;
  return ShowPoint(ctx, pt[0], pt[1]);
}

int PointDelete(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> pt;
  int rc;
  if (!PointArg(ctx, vm, &pt, &rc)) return rc;
  HttpReply r;
  if (!Call(ctx, "DELETE", RestorePointPath(pt[0], pt[1]), std::nullopt, &r, &rc)) return rc;
  if (ctx.output == OutputFormat::kTable) {
    ctx.out << "deleted restore point '" << pt[0] << "/" << pt[1] << "'\n";
  }
  return kExitOk;
}

void PrintVerify(Context& ctx, const json& output) {
  bool ok = output.value("ok", false);
  ctx.out << (ok ? "OK" : "DAMAGED") << ": " << Str(output, "chunksChecked") << " chunks, "
          << FormatSize(output.value("bytesRead", uint64_t{0})) << " read\n";
  const json damage = output.value("damage", json::array());
  if (damage.empty()) return;
  Table t({"DISK", "KIND", "OFFSET", "LENGTH", "REASON"});
  for (const json& d : damage) {
    t.add({Str(d, "disk"), Str(d, "kind"), Str(d, "offset"), Str(d, "length"), Str(d, "reason")});
  }
  t.print(ctx.out);
}

int PointVerify(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> pt;
  int rc;
  if (!PointArg(ctx, vm, &pt, &rc)) return rc;
  HttpReply r;
  if (!Call(ctx, "POST", RestorePointPath(pt[0], pt[1]) + "/verify", std::nullopt, &r, &rc)) {
    return rc;
  }
  std::string op = OperationIdOf(r);
  if (!vm.count("wait")) {
    if (ctx.output == OutputFormat::kJson && r.json) PrintJson(ctx, *r.json);
    PrintOperationHint(ctx, op);
    return kExitOk;
  }
  json done;
  rc = WaitForOperation(ctx, op, "verifying " + pt[0] + "/" + pt[1], &done);
  if (rc != kExitOk) return rc;
  json output = Props(done).value("output", json::object());
  // -o json prints the server's JSON: the finished operation, report inside.
  if (ctx.output == OutputFormat::kJson) {
    PrintJson(ctx, done);
  } else {
    PrintVerify(ctx, output);
  }
  return output.value("ok", false) ? kExitOk : kExitDamage;
}

void NoArgs(po::options_description&, po::options_description&,
            po::positional_options_description&) {}

void DeclareName(po::options_description&, po::options_description& h,
                 po::positional_options_description& p) {
  DeclareArg(h, p, "name");
}

}  // namespace

void AddRestorePointCommands(std::vector<Command>& table) {
  table.push_back({"collection", "create", "NAME --vm VM [--region REGION]",
                   "create a restore point collection of a VM (a VM may have one per region)",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("vm", po::value<std::string>()->value_name("VM")->required(),
                                     "the VM whose restore points it holds")(
                         "region", po::value<std::string>()->value_name("REGION"),
                         "the store to keep them in (default: the default region)");
                   },
                   CollectionCreate});
  table.push_back(
      {"collection", "list", "", "list restore point collections", NoArgs, CollectionList});
  table.push_back({"collection", "show", "NAME", "show a collection and its restore points",
                   DeclareName, CollectionShow});
  table.push_back({"collection", "delete", "NAME",
                   "delete a collection and all of its restore points", DeclareName,
                   CollectionDelete});

  table.push_back({"restore-point", "create",
                   "COLLECTION/NAME [--exclude-disk DISK ...] [--consistency fs|crash] [--wait]",
                   "take a restore point of the collection's VM (all its disks at one instant)",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("exclude-disk",
                                     po::value<std::vector<std::string>>()->value_name("DISK"),
                                     "leave this disk out (shared and ephemeral disks must be)")(
                         "consistency", po::value<std::string>()->value_name("MODE"),
                         "crash (default) or fs: run the VM's freeze/thaw hooks around the cut")(
                         "wait", "wait until the restore point is complete");
                   },
                   PointCreate});
  table.push_back({"restore-point", "copy", "SRC_COLLECTION/NAME DST_COLLECTION[/NAME] [--wait]",
                   "copy a restore point to a collection of the same VM in another region "
                   "(moves only the chunks that region lacks)",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     DeclareArg(h, p, "to");
                     o.add_options()("wait", "wait until the copy is complete, showing progress");
                   },
                   PointCopy});
  table.push_back({"restore-point", "list", "COLLECTION", "list the restore points of a collection",
                   DeclareName, PointList});
  table.push_back({"restore-point", "show", "COLLECTION/NAME",
                   "show a restore point and its disk restore points", DeclareName, PointShow});
  table.push_back({"restore-point", "delete", "COLLECTION/NAME",
                   "delete a restore point (its space returns at the store's next GC)", DeclareName,
                   PointDelete});
  table.push_back({"restore-point", "verify", "COLLECTION/NAME [--wait]",
                   "re-read and re-hash everything a restore point references",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("wait", "wait for the result (exit 4 if damage is found)");
                   },
                   PointVerify});

  table.push_back(
      {"region", "list", "", "list the restore point stores (regions)", NoArgs, RegionList});
  table.push_back({"region", "repair", "NAME",
                   "re-index a region from its pack files and import the restore points it "
                   "holds (deletes nothing)",
                   DeclareName, RegionRepair});
  table.push_back({"region", "gc", "NAME [--orphans]",
                   "collect garbage in a region now; --orphans also deletes store points no "
                   "restore point names and pack files the index cannot use",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("orphans",
                                     "also delete data no restore point names (explicit: this "
                                     "is never done on its own)");
                   },
                   RegionGc});
}

}  // namespace rpoint::cli
