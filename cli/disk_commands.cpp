// rpoint disk create|list|show|resize|delete.
#include <cctype>
#include <filesystem>
#include <ostream>

#include "cli/command.h"
#include "cli/size.h"
#include "cli/table.h"

namespace rpoint::cli {

namespace {

using json = nlohmann::ordered_json;

std::string SizeText(const json& props, const char* key = "sizeBytes") {
  auto it = props.find(key);
  if (it == props.end() || !it->is_number_unsigned()) return Str(props, key);
  return FormatSize(it->get<uint64_t>());
}

void PrintDisk(Context& ctx, const json& disk) {
  if (ctx.output == OutputFormat::kJson) return PrintJson(ctx, disk);
  const json& p = Props(disk);
  std::string size = SizeText(p);
  if (p.contains("sizeBytes")) size += " (" + Str(p, "sizeBytes") + " bytes)";
  std::string origin = p.contains("creationData") ? Str(p["creationData"], "createOption") : "";
  origin = origin == "Attach"    ? "adopted"
           : origin == "Empty"   ? "created"
           : origin == "Restore" ? "restored from " + Str(p["creationData"], "sourceResourceId")
                                 : origin;
  std::string nbd;
  if (p.contains("export") && p["export"].contains("nbd")) nbd = Str(p["export"]["nbd"], "name");
  std::string ublk;
  if (p.contains("export") && p["export"].contains("ublk")) {
    const json& u = p["export"]["ublk"];
    ublk = (u.contains("devicePath") ? Str(u, "devicePath") + " " : "") + "(" + Str(u, "state") + ")";
    if (nbd.size()) nbd += " (read-only)";
  }
  std::vector<std::pair<std::string, std::string>> f = {
      {"Name", Str(disk, "name")},
      {"Size", size},
      {"Kind", Str(p, "kind")},
      {"State", Str(p, "diskState")},
      {"Clients", Str(p, "attachedClients")},
      {"Path", Str(p, "path")},
      {"Device type", Str(p, "deviceType")},
      {"Origin", origin},
      {"Tracking block",
       p.contains("trackingGranularityBytes") ? SizeText(p, "trackingGranularityBytes") : ""},
      {"NBD export", nbd},
      {"ublk device", ublk},
      {"Created", Str(p, "timeCreated")},
      {"Provisioning", Str(p, "provisioningState")},
  };
  if (p.contains("error")) f.emplace_back("Error", Str(p["error"], "message"));
  PrintFields(ctx.out, f);
}

std::string Name(const po::variables_map& vm) {
  return vm["name"].as<std::string>();
}

void DeclareName(po::options_description&, po::options_description& hidden,
                 po::positional_options_description& p) {
  hidden.add_options()("name", po::value<std::string>()->required(), "disk name");
  p.add("name", 1);
}

int Create(Context& ctx, const po::variables_map& vm) {
  bool has_size = vm.count("size"), has_path = vm.count("path"), has_from = vm.count("from");
  if (int(has_size) + int(has_path) + int(has_from) != 1) {
    return UsageError(ctx, "give exactly one of --size, --path or --from");
  }
  if (vm.count("wait") && !has_from) return UsageError(ctx, "--wait goes with --from");
  json props = json::object();
  if (has_from) {
    std::vector<std::string> parts;
    if (!SplitNames(vm["from"].as<std::string>(), 3, &parts)) {
      return UsageError(ctx, "--from takes COLLECTION/RESTORE_POINT/DISK, got '" +
                                 vm["from"].as<std::string>() + "'");
    }
    props["creationData"] = {{"createOption", "Restore"},
                             {"sourceResourceId", RestorePointPath(parts[0], parts[1]) +
                                                      "/diskRestorePoints/" + Escape(parts[2])}};
  } else if (has_size) {
    auto size = ParseSize(vm["size"].as<std::string>());
    if (!size.ok()) return UsageError(ctx, size.status().message());
    props["sizeBytes"] = size.value();
  } else {
    // The daemon wants an absolute path; relative ones mean "from here".
    std::string path = vm["path"].as<std::string>();
    std::error_code ec;
    if (!path.empty() && path[0] != '/') {
      auto abs = std::filesystem::absolute(path, ec);
      if (!ec) path = abs.lexically_normal().string();
    }
    props["path"] = path;
  }
  if (vm.count("kind")) props["kind"] = vm["kind"].as<std::string>();
  if (vm.count("export")) props["export"] = vm["export"].as<std::string>();
  if (vm.count("granularity")) {
    auto g = ParseSize(vm["granularity"].as<std::string>());
    if (!g.ok()) return UsageError(ctx, "--granularity: " + g.status().message());
    props["trackingGranularityBytes"] = g.value();
  }
  HttpReply r;
  int rc;
  if (!Call(ctx, "PUT", "/disks/" + Escape(Name(vm)), json{{"properties", props}}, &r, &rc)) {
    return rc;
  }
  std::string op = OperationIdOf(r);
  if (!op.empty() && vm.count("wait")) {
    json done;
    rc = WaitForOperation(ctx, op, "restoring disk " + Name(vm), &done);
    if (rc != kExitOk) return rc;
    if (!Call(ctx, "GET", "/disks/" + Escape(Name(vm)), std::nullopt, &r, &rc)) return rc;
  } else if (op.empty() && vm.count("wait")) {
    // The restore already existed (a rerun): wait for it as for a new one.
    json disk;
    rc =
        WaitForProvisioning(ctx, "/disks/" + Escape(Name(vm)), "restoring disk " + Name(vm), &disk);
    if (rc != kExitOk) return rc;
    r.json = disk;
  }
  if (r.json) PrintDisk(ctx, *r.json);
  if (!op.empty() && !vm.count("wait")) PrintOperationHint(ctx, op);
  return kExitOk;
}

int List(Context& ctx, const po::variables_map&) {
  return ListResources(ctx, "/disks", "no disks",
                       {"NAME", "SIZE", "KIND", "STATE", "CLIENTS", "PATH"},
                       [](const json& d) -> std::vector<std::string> {
                         const json& p = Props(d);
                         return {Str(d, "name"),
                                 SizeText(p),
                                 Str(p, "kind"),
                                 Str(p, "diskState"),
                                 Str(p, "attachedClients"),
                                 Str(p, "path")};
                       });
}

int Show(Context& ctx, const po::variables_map& vm) {
  HttpReply r;
  int rc;
  if (!Call(ctx, "GET", "/disks/" + Escape(Name(vm)), std::nullopt, &r, &rc)) return rc;
  if (r.json) PrintDisk(ctx, *r.json);
  return kExitOk;
}

int Resize(Context& ctx, const po::variables_map& vm) {
  auto size = ParseSize(vm["size"].as<std::string>());
  if (!size.ok()) return UsageError(ctx, size.status().message());
  HttpReply r;
  int rc;
  json body = {{"properties", {{"sizeBytes", size.value()}}}};
  if (!Call(ctx, "PATCH", "/disks/" + Escape(Name(vm)), body, &r, &rc)) return rc;
  if (r.json) PrintDisk(ctx, *r.json);
  return kExitOk;
}

int Delete(Context& ctx, const po::variables_map& vm) {
  std::string path = "/disks/" + Escape(Name(vm));
  if (vm.count("force")) path += "?force=true";
  HttpReply r;
  int rc;
  if (!Call(ctx, "DELETE", path, std::nullopt, &r, &rc)) return rc;
  if (ctx.output == OutputFormat::kTable) ctx.out << "deleted disk '" << Name(vm) << "'\n";
  return kExitOk;
}

}  // namespace

void AddDiskCommands(std::vector<Command>& table) {
  table.push_back({"disk", "create",
                   "NAME (--size SIZE | --path PATH | --from C/RP/DISK [--wait]) [--kind KIND] "
                   "[--granularity BYTES] [--export nbd|ublk]",
                   "create a sparse disk of SIZE, adopt an existing file or block device, or "
                   "restore a disk from a restore point",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()(
                         "size", po::value<std::string>()->value_name("SIZE"),
                         "size of a new disk: bytes or K, M, G, T, P (binary), e.g. 10G")(
                         "path", po::value<std::string>()->value_name("PATH"),
                         "adopt this existing file or block device instead")(
                         "from", po::value<std::string>()->value_name("C/RP/DISK"),
                         "restore from this disk restore point (collection/restore "
                         "point/disk); the disk is served once the restore finishes")(
                         "wait", "with --from: wait until the restore finishes")(
                         "kind", po::value<std::string>()->value_name("KIND"),
                         "managed (default), shared or ephemeral")(
                         "granularity", po::value<std::string>()->value_name("BYTES"),
                         "change tracking block size for restore points: a power of two "
                         "from 4K to 4M (default 64K)")(
                         "export", po::value<std::string>()->value_name("nbd|ublk"),
                         "how the disk is served: nbd (default) or ublk, a local "
                         "/dev/ublkbN (NBD clients then read it only)");
                   },
                   Create});
  table.push_back({"disk", "list", "", "list disks",
                   [](po::options_description&, po::options_description&,
                      po::positional_options_description&) {},
                   List});
  table.push_back({"disk", "show", "NAME", "show one disk", DeclareName, Show});
  table.push_back({"disk", "resize", "NAME --size SIZE", "grow a disk to SIZE",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("size",
                                     po::value<std::string>()->value_name("SIZE")->required(),
                                     "new size (larger than the current one), e.g. 20G");
                   },
                   Resize});
  table.push_back({"disk", "delete", "NAME [--force]",
                   "delete a disk (created files are removed; adopted storage is left alone)",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("force,f",
                                     "delete even with NBD clients attached (they are "
                                     "disconnected)");
                   },
                   Delete});
}

}  // namespace rpoint::cli
