// rpoint vm create|list|show|delete|restore.
#include <fstream>
#include <iostream>
#include <iterator>
#include <ostream>
#include <sstream>

#include "cli/command.h"
#include "cli/table.h"

namespace rpoint::cli {

namespace {

using json = nlohmann::ordered_json;

std::string Name(const po::variables_map& vm) {
  return vm["name"].as<std::string>();
}

std::string DiskList(const json& props) {
  std::string s;
  if (auto it = props.find("disks"); it != props.end() && it->is_array()) {
    for (const json& d : *it) s += (s.empty() ? "" : ", ") + Str(d, "name");
  }
  return s;
}

void PrintVm(Context& ctx, const json& vm) {
  if (ctx.output == OutputFormat::kJson) return PrintJson(ctx, vm);
  const json& p = Props(vm);
  std::string config = p.contains("configuration") ? p["configuration"].dump() : "{}";
  if (config.size() > 200) config = config.substr(0, 197) + "...";
  PrintFields(ctx.out, {{"Name", Str(vm, "name")},
                        {"Disks", DiskList(p)},
                        {"Configuration", config},
                        {"Created", Str(p, "timeCreated")},
                        {"Provisioning", Str(p, "provisioningState")}});
}

void DeclareName(po::options_description&, po::options_description& hidden,
                 po::positional_options_description& p) {
  hidden.add_options()("name", po::value<std::string>()->required(), "VM name");
  p.add("name", 1);
}

// --config FILE or - (stdin): any JSON value, kept with the VM and its restore points.
bool ReadConfiguration(Context& ctx, const std::string& source, json* out, int* rc) {
  std::string text;
  if (source == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    std::ifstream in(source, std::ios::binary);
    if (!in) {
      *rc = UsageError(ctx, "--config: cannot read '" + source + "'");
      return false;
    }
    std::stringstream buf;
    buf << in.rdbuf();
    text = buf.str();
  }
  *out = json::parse(text, nullptr, false);
  if (out->is_discarded()) {
    *rc = UsageError(ctx, "--config: '" + source + "' is not JSON");
    return false;
  }
  return true;
}

int Create(Context& ctx, const po::variables_map& vm) {
  json disks = json::array();
  if (vm.count("disk")) {
    for (const std::string& d : vm["disk"].as<std::vector<std::string>>()) {
      disks.push_back({{"id", "/disks/" + d}});
    }
  }
  json props = {{"disks", disks}};
  if (vm.count("config")) {
    json config;
    int rc;
    if (!ReadConfiguration(ctx, vm["config"].as<std::string>(), &config, &rc)) return rc;
    props["configuration"] = std::move(config);
  }
  HttpReply r;
  int rc;
  if (!Call(ctx, "PUT", "/vms/" + Escape(Name(vm)), json{{"properties", props}}, &r, &rc)) {
    return rc;
  }
  if (r.json) PrintVm(ctx, *r.json);
  return kExitOk;
}

int List(Context& ctx, const po::variables_map&) {
  return ListResources(ctx, "/vms", "no VMs", {"NAME", "DISKS", "CREATED"},
                       [](const json& v) -> std::vector<std::string> {
                         const json& p = Props(v);
                         return {Str(v, "name"), DiskList(p), Str(p, "timeCreated")};
                       });
}

int Show(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  if (!Call(ctx, "GET", "/vms/" + Escape(Name(vm)), std::nullopt, &r, &rc)) return rc;
  if (r.json) PrintVm(ctx, *r.json);
  return kExitOk;
}

int Delete(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  if (!Call(ctx, "DELETE", "/vms/" + Escape(Name(vm)), std::nullopt, &r, &rc)) return rc;
  if (ctx.output == OutputFormat::kTable) {
    ctx.out << "deleted VM '" << Name(vm) << "' (its disks and restore points remain)\n";
  }
  return kExitOk;
}

int Restore(Context& ctx, const po::variables_map& vm) {
  std::vector<std::string> point;
  std::string source = vm["point"].as<std::string>();
  if (!SplitNames(source, 2, &point)) {
    return UsageError(ctx, "expected COLLECTION/RESTORE_POINT, got '" + source + "'");
  }
  json body = {{"vmName", Name(vm)}};
  if (vm.count("disk-name")) {
    json names = json::object();
    for (const std::string& m : vm["disk-name"].as<std::vector<std::string>>()) {
      auto eq = m.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == m.size()) {
        return UsageError(ctx, "--disk-name takes SOURCE=NEW, got '" + m + "'");
      }
      names[m.substr(0, eq)] = m.substr(eq + 1);
    }
    body["diskNames"] = std::move(names);
  }
  HttpReply r;
  int rc;
  if (!Call(ctx, "POST", RestorePointPath(point[0], point[1]) + "/restore", body, &r, &rc)) {
    return rc;
  }
  std::string op = OperationIdOf(r);
  if (!vm.count("wait")) {
    if (ctx.output == OutputFormat::kJson && r.json) PrintJson(ctx, *r.json);
    PrintOperationHint(ctx, op);
    return kExitOk;
  }
  json done;
  rc = WaitForOperation(ctx, op, "restoring VM " + Name(vm), &done);
  if (rc != kExitOk) return rc;
  if (!Call(ctx, "GET", "/vms/" + Escape(Name(vm)), std::nullopt, &r, &rc)) return rc;
  if (r.json) PrintVm(ctx, *r.json);
  return kExitOk;
}

}  // namespace

void AddVmCommands(std::vector<Command>& table) {
  table.push_back({"vm", "create", "NAME --disk DISK [--disk DISK ...] [--config FILE|-]",
                   "define (or redefine) a VM: the disks its restore points capture together",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("disk",
                                     po::value<std::vector<std::string>>()->value_name("DISK"),
                                     "a disk of the VM (repeat for each, in order)")(
                         "config", po::value<std::string>()->value_name("FILE"),
                         "the VM's configuration as JSON (- reads stdin); restore points "
                         "keep it and restores bring it back");
                   },
                   Create});
  table.push_back({"vm", "list", "", "list VMs",
                   [](po::options_description&, po::options_description&,
                      po::positional_options_description&) {},
                   List});
  table.push_back({"vm", "show", "NAME", "show one VM", DeclareName, Show});
  table.push_back({"vm", "delete", "NAME",
                   "delete a VM definition (its disks, collection and restore points stay)",
                   DeclareName, Delete});
  table.push_back(
      {"vm", "restore", "COLLECTION/RESTORE_POINT NEWVM [--disk-name SRC=NEW ...] [--wait]",
       "create VM NEWVM and its disks from a restore point",
       [](po::options_description& o, po::options_description& h,
          po::positional_options_description& p) {
         h.add_options()("point", po::value<std::string>()->required(), "restore point")(
             "name", po::value<std::string>()->required(), "new VM name");
         p.add("point", 1).add("name", 1);
         o.add_options()("disk-name", po::value<std::vector<std::string>>()->value_name("SRC=NEW"),
                         "name the disk restored from SRC (default: NEWVM-SRC)")(
             "wait", "wait until the restore finishes");
       },
       Restore});
}

}  // namespace rpoint::cli
