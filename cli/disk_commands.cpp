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

std::string Str(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

const json& Props(const json& disk) {
  static const json kEmpty = json::object();
  auto it = disk.find("properties");
  return it != disk.end() && it->is_object() ? *it : kEmpty;
}

std::string SizeText(const json& props) {
  auto it = props.find("sizeBytes");
  if (it == props.end() || !it->is_number_unsigned()) return Str(props, "sizeBytes");
  return FormatSize(it->get<uint64_t>());
}

void PrintDisk(Context& ctx, const json& disk) {
  if (ctx.output == OutputFormat::kJson) return PrintJson(ctx, disk);
  const json& p = Props(disk);
  std::string size = SizeText(p);
  if (p.contains("sizeBytes")) size += " (" + Str(p, "sizeBytes") + " bytes)";
  std::string origin = p.contains("creationData") ? Str(p["creationData"], "createOption") : "";
  origin = origin == "Attach" ? "adopted" : origin == "Empty" ? "created" : origin;
  std::string nbd;
  if (p.contains("export") && p["export"].contains("nbd")) nbd = Str(p["export"]["nbd"], "name");
  std::vector<std::pair<std::string, std::string>> f = {
      {"Name", Str(disk, "name")},
      {"Size", size},
      {"Kind", Str(p, "kind")},
      {"State", Str(p, "diskState")},
      {"Clients", Str(p, "attachedClients")},
      {"Path", Str(p, "path")},
      {"Device type", Str(p, "deviceType")},
      {"Origin", origin},
      {"NBD export", nbd},
      {"Created", Str(p, "timeCreated")},
      {"Provisioning", Str(p, "provisioningState")},
  };
  if (p.contains("error")) f.emplace_back("Error", Str(p["error"], "message"));
  PrintFields(ctx.out, f);
}

std::string Name(const po::variables_map& vm) { return vm["name"].as<std::string>(); }

// Names go in the URL: escape anything the server would not take literally,
// so a bad name gets the server's validation message, not a garbled path.
std::string Escape(const std::string& s) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.') {
      out.push_back(static_cast<char>(c));
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

void DeclareName(po::options_description&, po::options_description& hidden,
                 po::positional_options_description& p) {
  hidden.add_options()("name", po::value<std::string>()->required(), "disk name");
  p.add("name", 1);
}

int Create(Context& ctx, const po::variables_map& vm) {
  bool has_size = vm.count("size"), has_path = vm.count("path");
  if (has_size == has_path) return UsageError(ctx, "give exactly one of --size or --path");
  json props = json::object();
  if (has_size) {
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
  HttpReply r;
  int rc;
  if (!Call(ctx, "PUT", "/disks/" + Escape(Name(vm)), json{{"properties", props}}, &r, &rc)) {
    return rc;
  }
  if (r.json) PrintDisk(ctx, *r.json);
  return kExitOk;
}

int List(Context& ctx, const po::variables_map&) {
  HttpReply r;
  int rc;
  if (!Call(ctx, "GET", "/disks", std::nullopt, &r, &rc)) return rc;
  if (!r.json) {
    ctx.err << "rpoint: rpointd sent a reply that is not JSON\n";
    return kExitServerError;
  }
  if (ctx.output == OutputFormat::kJson) {
    PrintJson(ctx, *r.json);
    return kExitOk;
  }
  const json& value = r.json->contains("value") ? (*r.json)["value"] : json::array();
  if (value.empty()) {
    ctx.err << "no disks\n";
    return kExitOk;
  }
  Table t({"NAME", "SIZE", "KIND", "STATE", "CLIENTS", "PATH"});
  for (const json& d : value) {
    const json& p = Props(d);
    t.add({Str(d, "name"), SizeText(p), Str(p, "kind"), Str(p, "diskState"),
           Str(p, "attachedClients"), Str(p, "path")});
  }
  t.print(ctx.out);
  return kExitOk;
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
  table.push_back({"disk", "create", "NAME (--size SIZE | --path PATH) [--kind KIND]",
                   "create a sparse disk of SIZE, or adopt an existing file or block device",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()
                         ("size", po::value<std::string>()->value_name("SIZE"),
                          "size of a new disk: bytes or K, M, G, T, P (binary), e.g. 10G")
                         ("path", po::value<std::string>()->value_name("PATH"),
                          "adopt this existing file or block device instead")
                         ("kind", po::value<std::string>()->value_name("KIND"),
                          "managed (default), shared or ephemeral");
                   },
                   Create});
  table.push_back({"disk", "list", "", "list disks",
                   [](po::options_description&, po::options_description&,
                      po::positional_options_description&) {}, List});
  table.push_back({"disk", "show", "NAME", "show one disk", DeclareName, Show});
  table.push_back({"disk", "resize", "NAME --size SIZE", "grow a disk to SIZE",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("size", po::value<std::string>()->value_name("SIZE")->required(),
                                     "new size (larger than the current one), e.g. 20G");
                   },
                   Resize});
  table.push_back({"disk", "delete", "NAME [--force]",
                   "delete a disk (created files are removed; adopted storage is left alone)",
                   [](po::options_description& o, po::options_description& h,
                      po::positional_options_description& p) {
                     DeclareName(o, h, p);
                     o.add_options()("force,f", "delete even with NBD clients attached (they are "
                                                "disconnected)");
                   },
                   Delete});
}

}  // namespace rpoint::cli
