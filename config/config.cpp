// Parsing and validation of the daemon's YAML configuration.
//
// The parser walks the document itself (instead of asking yaml-cpp for typed
// values) so every error can name the dotted key and the line it is on, and so
// unknown keys are caught rather than silently ignored: a misspelt key that is
// ignored is a setting the operator believes is in force and is not.
#include "config/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <sys/un.h>

#include "common/logging.h"

namespace rpoint {
namespace {

constexpr unsigned kMaxQueueDepth = 32768;  // IORING_MAX_ENTRIES
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxOpenPacks = 65536;
constexpr unsigned kMaxHookTimeout = 3600;  // a freeze longer than an hour is a hung guest
constexpr unsigned kMaxOperationRetention = 366u * 86400u;  // a year
constexpr unsigned kMaxOperationCount = 1000000;
constexpr unsigned kMaxGrantSeconds = 365u * 86400;  // an access grant of a year at most

// Thrown inside this file only (never across its interface): it lets the
// recursive walk below stop at the first error without threading a Status
// through every lambda.
struct ConfigError {
  Status status;
};

std::string MarkText(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

const char* KindName(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null: return "nothing";
    case YAML::NodeType::Scalar: return "a scalar";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Undefined: return "nothing";
  }
  return "something else";
}

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// One value being parsed: where it is and what it is called.
struct Item {
  const YAML::Node& key;    // the key node (its mark is the fallback)
  const YAML::Node& value;  // never null here: null values mean "default"
  const std::string& path;  // dotted key, e.g. "io.queue_depth"
};

class Parser {
 public:
  Parser(std::string source, Config* config) : source_(std::move(source)), config_(config) {}

  [[noreturn]] void Fail(const YAML::Mark& mark, const std::string& path, const std::string& msg) {
    std::string where = MarkText(source_, mark);
    throw ConfigError{Status::InvalidArgument(where + ": " + (path.empty() ? "" : path + ": ") + msg)};
  }
  [[noreturn]] void Fail(const Item& it, const std::string& msg) {
    Fail(MarkOf(it), it.path, msg);
  }

  static YAML::Mark MarkOf(const Item& it) {
    YAML::Mark m = it.value.Mark();
    return m.is_null() ? it.key.Mark() : m;
  }

  using Handler = std::function<void(const Item&)>;
  struct Field {
    const char* name;
    Handler handle;
  };

  // Walks a mapping: each key must be one of `fields`, at most once. Null
  // values leave the default in place.
  void WalkMap(const YAML::Node& node, const YAML::Mark& where, const std::string& path,
               const std::vector<Field>& fields) {
    if (!node.IsMap()) {
      Fail(node.Mark().is_null() ? where : node.Mark(), path,
           std::string("expected a mapping of keys, got ") + KindName(node));
    }
    std::set<std::string> seen;
    for (auto kv : node) {
      const YAML::Node& k = kv.first;
      if (!k.IsScalar()) Fail(k.Mark(), path, std::string("keys must be plain words, got ") + KindName(k));
      const std::string& name = k.Scalar();
      const std::string full = path.empty() ? name : path + "." + name;
      auto field = std::find_if(fields.begin(), fields.end(),
                                [&](const Field& f) { return name == f.name; });
      if (field == fields.end()) Fail(k.Mark(), full, UnknownKeyMessage(name, fields));
      if (!seen.insert(name).second) Fail(k.Mark(), full, "duplicate key");
      const YAML::Node& v = kv.second;
      YAML::Mark m = v.Mark().is_null() ? k.Mark() : v.Mark();
      config_->origins[full] = MarkText(source_, m);
      if (v.IsNull()) continue;
      field->handle(Item{k, v, full});
    }
  }

  std::string UnknownKeyMessage(const std::string& name, const std::vector<Field>& fields) {
    std::string best;
    size_t best_d = 3;  // suggest only close matches
    std::string all;
    for (const auto& f : fields) {
      size_t d = EditDistance(name, f.name);
      if (d < best_d) best_d = d, best = f.name;
      all += (all.empty() ? "" : ", ") + std::string(f.name);
    }
    std::string msg = "unknown key";
    if (!best.empty()) msg += " (did you mean '" + best + "'?)";
    return msg + "; expected one of: " + all;
  }

  const std::string& Scalar(const Item& it, const char* what) {
    if (!it.value.IsScalar()) Fail(it, std::string("expected ") + what + ", got " + KindName(it.value));
    return it.value.Scalar();
  }

  std::string String(const Item& it) { return Scalar(it, "a string"); }

  std::string NonEmptyString(const Item& it) {
    std::string s = String(it);
    if (s.empty()) Fail(it, "must not be empty");
    return s;
  }

  unsigned Unsigned(const Item& it, unsigned lo, unsigned hi) {
    const std::string& s = Scalar(it, "a number");
    std::string range = "a whole number from " + std::to_string(lo) + " to " + std::to_string(hi);
    if (s.empty() || s.size() > 10 || !std::all_of(s.begin(), s.end(), ::isdigit)) {
      Fail(it, "must be " + range + ", got '" + s + "'");
    }
    unsigned long long v = std::stoull(s);
    if (v < lo || v > hi) Fail(it, "must be " + range + ", got " + s);
    return static_cast<unsigned>(v);
  }

  bool Bool(const Item& it) {
    std::string s = Scalar(it, "true or false");
    std::transform(s.begin(), s.end(), s.begin(), ::tolower);
    if (s == "true" || s == "yes" || s == "on") return true;
    if (s == "false" || s == "no" || s == "off") return false;
    Fail(it, "must be true or false, got '" + it.value.Scalar() + "'");
  }

  // Permission bits, always read as octal ("0660", 0660, 660 and 0o660 all mean rw-rw----).
  uint32_t Mode(const Item& it) {
    const std::string& s = Scalar(it, "an octal mode like \"0660\"");
    std::string digits = s;
    if (digits.rfind("0o", 0) == 0 || digits.rfind("0O", 0) == 0) digits = digits.substr(2);
    bool octal = !digits.empty() && digits.size() <= 6 &&
                 std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '7'; });
    if (!octal) Fail(it, "must be an octal mode like \"0660\", got '" + s + "'");
    uint32_t v = static_cast<uint32_t>(std::stoul(digits, nullptr, 8));
    if (v > 0777) Fail(it, "must be permission bits no larger than 0777, got '" + s + "'");
    return v;
  }

  std::optional<TcpAddress> Tcp(const Item& it) {
    const std::string& s = Scalar(it, "\"host:port\"");
    if (s.empty()) return std::nullopt;
    TcpAddress a;
    std::string port;
    if (s[0] == '[') {
      size_t close = s.find(']');
      if (close == std::string::npos) Fail(it, "missing ']' in '" + s + "'");
      a.host = s.substr(1, close - 1);
      std::string rest = s.substr(close + 1);
      if (!rest.empty()) {
        if (rest[0] != ':') Fail(it, "expected ':' after ']' in '" + s + "'");
        port = rest.substr(1);
        if (port.empty()) Fail(it, "missing port after ':' in '" + s + "'");
      }
      if (a.host.find(':') == std::string::npos) Fail(it, "brackets are for IPv6 addresses, got '" + s + "'");
    } else {
      size_t colons = std::count(s.begin(), s.end(), ':');
      if (colons > 1) Fail(it, "IPv6 addresses need brackets, e.g. \"[::1]:10809\", got '" + s + "'");
      size_t colon = s.find(':');
      a.host = s.substr(0, colon);
      if (colon != std::string::npos) {
        port = s.substr(colon + 1);
        if (port.empty()) Fail(it, "missing port after ':' in '" + s + "'");
      }
      if (!a.host.empty() && std::all_of(a.host.begin(), a.host.end(), ::isdigit)) {
        Fail(it, "must be \"host:port\", e.g. \"127.0.0.1:10809\", got '" + s + "'");
      }
    }
    if (a.host.empty()) {
      Fail(it, "needs a host, e.g. \"127.0.0.1:10809\" (\"0.0.0.0:10809\" or \"[::]:10809\" for every address)");
    }
    if (std::any_of(a.host.begin(), a.host.end(), [](char c) { return std::isspace(c) || c == '/'; })) {
      Fail(it, "bad host '" + a.host + "'");
    }
    if (!port.empty()) {
      if (port.size() > 5 || !std::all_of(port.begin(), port.end(), ::isdigit)) {
        Fail(it, "port must be a number from 1 to 65535, got '" + port + "'");
      }
      unsigned long p = std::stoul(port);
      if (p < 1 || p > 65535) Fail(it, "port must be a number from 1 to 65535, got " + port);
      a.port = static_cast<uint16_t>(p);
    }
    return a;
  }

  std::string LogLevel(const Item& it) {
    std::string s = Scalar(it, "a log level");
    spdlog::level::level_enum level;
    Status st = ParseLogLevel(s, &level);
    if (!st.ok()) Fail(it, st.message());
    return s;
  }

  void Regions(const Item& it) {
    if (!it.value.IsSequence()) {
      Fail(it, std::string("expected a list of {name, path, default}, got ") + KindName(it.value));
    }
    std::set<std::string> names;
    const RegionConfig* first_default = nullptr;
    size_t i = 0;
    // Pointers into config_->regions are stable: reserve before filling.
    config_->regions.clear();
    config_->regions.reserve(it.value.size());
    for (const auto& entry : it.value) {
      std::string path = it.path + "[" + std::to_string(i++) + "]";
      RegionConfig r;
      bool has_name = false, has_path = false;
      WalkMap(entry, entry.Mark(), path,
              {{"name",
                [&](const Item& x) {
                  r.name = String(x);
                  Status st = ValidateRegionName(r.name);
                  if (!st.ok()) Fail(x, st.message());
                  if (!names.insert(r.name).second)
                    Fail(x, "duplicate region name '" + r.name + "'");
                  has_name = true;
                }},
               {"path",
                [&](const Item& x) {
                  r.path = String(x);
                  if (r.path.empty() || r.path[0] != '/')
                    Fail(x, "must be an absolute path, got '" + r.path + "'");
                  has_path = true;
                }},
               {"default", [&](const Item& x) { r.is_default = Bool(x); }},
               {"peer",
                [&](const Item& x) {
                  auto t = Tcp(x);
                  if (!t) Fail(x, "expected \"host:port\" of the peer's peers.listen");
                  r.peer = FormatTcpAddress(*t);
                }},
               {"peer_region", [&](const Item& x) {
                  r.peer_region = String(x);
                  Status st = ValidateRegionName(r.peer_region);
                  if (!st.ok()) Fail(x, st.message());
                }}});
      if (!has_name) Fail(entry.Mark(), path + ".name", "missing (every region needs a name)");
      if (has_path && r.remote())
        Fail(entry.Mark(), path + ".peer", "a region has a path or a peer, not both");
      if (!has_path && !r.remote()) {
        Fail(entry.Mark(), path + ".path",
             "missing (every region needs an absolute path, or a peer)");
      }
      if (r.remote() && r.is_default)
        Fail(entry.Mark(), path + ".default", "a peer region cannot be the default");
      if (r.remote() && r.peer_region.empty()) r.peer_region = "local";
      config_->regions.push_back(r);
      if (r.is_default) {
        if (first_default) {
          Fail(entry.Mark(), path + ".default",
               "only one region can be the default ('" + first_default->name + "' already is)");
        }
        first_default = &config_->regions.back();
      }
    }
    if (config_->regions.size() > 1 && !first_default) {
      Fail(it.key.Mark(), it.path, "with several regions, one needs \"default: true\"");
    }
  }

  // adopt_paths: [absolute directory, ...]
  void AdoptPaths(const Item& it) {
    if (!it.value.IsSequence()) {
      Fail(it, std::string("expected a list of absolute directories, got ") + KindName(it.value));
    }
    std::vector<std::string>& paths = config_->adopt_paths;
    paths.clear();
    size_t i = 0;
    for (const auto& entry : it.value) {
      std::string key = it.path + "[" + std::to_string(i++) + "]";
      std::string p = String(Item{it.key, entry, key});
      if (p.empty() || p[0] != '/') {
        Fail(entry.Mark(), key, "must be an absolute path, got '" + p + "'");
      }
      paths.push_back(p);
    }
  }

  // consistency: {hook_timeout_seconds, freeze, thaw, vms: {NAME: {freeze, thaw}}}
  void Consistency(const Item& it) {
    ConsistencyConfig& cc = config_->consistency;
    WalkMap(it.value, MarkOf(it), it.path,
            {{"hook_timeout_seconds",
              [&](const Item& x) { cc.hook_timeout_seconds = Unsigned(x, 1, kMaxHookTimeout); }},
             {"freeze", [&](const Item& x) { cc.defaults.freeze = String(x); }},
             {"thaw", [&](const Item& x) { cc.defaults.thaw = String(x); }},
             {"vms", [&](const Item& x) { VmHooks(x); }}});
  }

  // VM names are keys here, so this walks the mapping itself (WalkMap wants a
  // fixed set of keys) and validates each name as the API does.
  void VmHooks(const Item& it) {
    if (!it.value.IsMap()) {
      Fail(it, std::string("expected a mapping of VM names to {freeze, thaw}, got ") +
                   KindName(it.value));
    }
    auto& vms = config_->consistency.vms;
    vms.clear();
    for (auto kv : it.value) {
      const YAML::Node& k = kv.first;
      if (!k.IsScalar()) Fail(k.Mark(), it.path, std::string("VM names must be plain words, got ") + KindName(k));
      const std::string& vm = k.Scalar();
      const std::string full = it.path + "." + vm;
      Status st = ValidateName(vm, "VM name");
      if (!st.ok()) Fail(k.Mark(), full, st.message());
      if (vms.count(vm)) Fail(k.Mark(), full, "duplicate VM");
      const YAML::Node& v = kv.second;
      config_->origins[full] = MarkText(source_, v.Mark().is_null() ? k.Mark() : v.Mark());
      ConsistencyConfig::VmHooks hooks;
      if (!v.IsNull()) {
        WalkMap(v, k.Mark(), full,
                {{"freeze", [&](const Item& x) { hooks.freeze = String(x); }},
                 {"thaw", [&](const Item& x) { hooks.thaw = String(x); }}});
      }
      vms[vm] = hooks;
    }
  }

  std::string TlsModeText(const Item& it) {
    std::string v = String(it);
    if (v != "off" && v != "allow" && v != "require") {
      Fail(it, "expected off, allow or require, got '" + v + "'");
    }
    return v;
  }

  std::string ZeroCopyText(const Item& it) {
    std::string v = String(it);
    if (v != "auto" && v != "on" && v != "off") {
      Fail(it, "expected auto, on or off, got '" + v + "'");
    }
    return v;
  }

  std::string TaskrunText(const Item& it) {
    std::string v = String(it);
    if (v != "defer" && v != "coop" && v != "plain") {
      Fail(it, "expected defer, coop or plain, got '" + v + "'");
    }
    return v;
  }

  // A power of two from 4 KiB to 32 MiB: whole pages (the driver rounds the
  // buffer down to pages, O_DIRECT wants 4 KiB), and 32 MiB is what a tag's
  // window in the user-copy address space holds (UBLK_IO_BUF_BITS 25, ublk/control.h).
  uint32_t UblkIoBytes(const Item& it) {
    unsigned v = Unsigned(it, kMinUblkIoBytes, kMaxUblkIoBytes);
    if ((v & (v - 1)) != 0) {
      Fail(it, "must be a power of two (4096, 8192, ..., 1048576, ..., 33554432), got " +
                   std::to_string(v));
    }
    return v;
  }

  static Status ValidateRegionName(const std::string& name) { return ValidateName(name, "region name"); }

  // Region and VM names: the API's resource name rule.
  static Status ValidateName(const std::string& name, const std::string& what) {
    if (name.empty() || name.size() > 63) return Status::InvalidArgument(what + " must be 1-63 characters");
    if (name[0] == '.' || name[0] == '-') {
      return Status::InvalidArgument(what + " must not start with '.' or '-', got '" + name + "'");
    }
    for (char c : name) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
        return Status::InvalidArgument(what + " may only contain A-Z a-z 0-9 . _ -, got '" + name + "'");
      }
    }
    return Status::Ok();
  }

  void Document(const YAML::Node& root) {
    if (root.IsNull()) return;  // an empty file: every default
    Config& c = *config_;
    WalkMap(root, root.Mark(), "",
            {{"state_dir", [&](const Item& it) { c.state_dir = NonEmptyString(it); }},
             {"disks_dir", [&](const Item& it) { c.disks_dir = String(it); }},
             {"metadata_db", [&](const Item& it) { c.metadata_db = String(it); }},
             {"tracking_dir", [&](const Item& it) { c.tracking_dir = String(it); }},
             {"staging_dir", [&](const Item& it) { c.staging_dir = String(it); }},
             {"control",
              [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"socket", [&](const Item& x) { c.control_socket = String(x); }},
                         {"mode", [&](const Item& x) { c.control_socket_mode = Mode(x); }}});
              }},
             {"nbd",
              [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"socket", [&](const Item& x) { c.nbd_socket = String(x); }},
                         {"mode", [&](const Item& x) { c.nbd_socket_mode = Mode(x); }},
                         {"tcp", [&](const Item& x) { c.nbd_tcp = Tcp(x); }},
                         {"tls", [&](const Item& x) { c.nbd_tls = TlsModeText(x); }},
                         {"unix_tls", [&](const Item& x) { c.nbd_unix_tls = TlsModeText(x); }}});
              }},
             {"tls",
              [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"dir", [&](const Item& x) { c.tls.dir = String(x); }},
                         {"psk_file", [&](const Item& x) { c.tls.psk_file = String(x); }},
                         {"verify_peer", [&](const Item& x) { c.tls.verify_peer = Bool(x); }}});
              }},
             {"log",
              [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"level", [&](const Item& x) { c.log_level = LogLevel(x); }}});
              }},
             {"io",
              [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"queue_depth", [&](const Item& x) { c.io_queue_depth = Unsigned(x, 1, kMaxQueueDepth); }},
                         {"threads", [&](const Item& x) { c.io_threads = Unsigned(x, 0, kMaxThreads); }},
                         {"direct", [&](const Item& x) { c.direct_io = Bool(x); }}});
              }},
             {"store",
              [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"open_packs", [&](const Item& x) { c.store_open_packs = Unsigned(x, 1, kMaxOpenPacks); }}});
              }},
             {"regions", [&](const Item& it) { Regions(it); }},
             {"peers",
              [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"listen", [&](const Item& x) { c.peers_listen = Tcp(x); }},
                         {"deadline_seconds",
                          [&](const Item& x) { c.peers_deadline_seconds = Unsigned(x, 1, 86400); }}});
              }},
             {"adopt_paths", [&](const Item& it) { AdoptPaths(it); }},
             {"consistency", [&](const Item& it) { Consistency(it); }},
             {"operations",
              [&](const Item& it) {
                OperationsConfig& o = c.operations;
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"retention_seconds",
                          [&](const Item& x) { o.retention_seconds = Unsigned(x, 1, kMaxOperationRetention); }},
                         {"max_count", [&](const Item& x) { o.max_count = Unsigned(x, 1, kMaxOperationCount); }}});
              }},
             {"access", [&](const Item& it) {
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"listener", [&](const Item& x) { c.access.listener = String(x); }},
                         {"host", [&](const Item& x) { c.access.host = String(x); }},
                         {"tcp_grants_only", [&](const Item& x) { c.access.tcp_grants_only = Bool(x); }},
                         {"max_duration_seconds", [&](const Item& x) {
                            c.access.max_duration_seconds = Unsigned(x, 1, kMaxGrantSeconds);
                          }}});
              }},
             {"ublk",
              [&](const Item& it) {
                // Depth: the driver's UBLK_MAX_QUEUE_DEPTH is 4096, but old
                // drivers overflowed above ~2700 (SPDK caps 1024): 1024 here.
                WalkMap(it.value, MarkOf(it), it.path,
                        {{"queues", [&](const Item& x) { c.ublk_queues = Unsigned(x, 0, 64); }},
                         {"depth", [&](const Item& x) { c.ublk_depth = Unsigned(x, 1, 1024); }},
                         {"user_copy", [&](const Item& x) { c.ublk_user_copy = Bool(x); }},
                         {"zero_copy", [&](const Item& x) { c.ublk_zero_copy = ZeroCopyText(x); }},
                         {"taskrun", [&](const Item& x) { c.ublk_taskrun = TaskrunText(x); }},
                         {"pin_queues", [&](const Item& x) { c.ublk_pin_queues = Bool(x); }},
                         {"max_io_bytes",
                          [&](const Item& x) { c.ublk_max_io_bytes = UblkIoBytes(x); }}});
              }}});
  }

 private:
  std::string source_;
  Config* config_;
};

// --- FinalizeConfig helpers ---

Status KeyError(const Config& c, const std::string& key, const std::string& msg) {
  auto it = c.origins.find(key);
  std::string prefix = it != c.origins.end() ? it->second + ": " : "";
  return Status::InvalidArgument(prefix + key + ": " + msg);
}

std::string Normal(const std::filesystem::path& p) {
  std::string s = p.lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

// Empty -> <state_dir>/<name>; relative -> under state_dir; then normalised.
void ResolveUnder(const std::string& state_dir, std::string& path, const char* default_name) {
  if (path.empty()) path = default_name;
  std::filesystem::path p(path);
  path = Normal(p.is_absolute() ? p : std::filesystem::path(state_dir) / p);
}

}  // namespace

Result<Config> ParseConfig(const std::string& yaml_text, const std::string& source) {
  Config config;
  Parser parser(source, &config);
  try {
    std::vector<YAML::Node> docs = YAML::LoadAll(yaml_text);
    if (docs.size() > 1) {
      return Status::InvalidArgument(MarkText(source, docs[1].Mark()) +
                                     ": only one YAML document is allowed (found a second '---')");
    }
    if (!docs.empty()) parser.Document(docs[0]);
  } catch (const ConfigError& e) {
    return e.status;
  } catch (const YAML::Exception& e) {
    // Syntax errors: yaml-cpp's mark is the place it gave up.
    return Status::InvalidArgument(MarkText(source, e.mark) + ": YAML syntax error: " + e.msg);
  } catch (const std::exception& e) {
    return Status::InvalidArgument(source + ": " + e.what());
  }
  return config;
}

Result<Config> LoadConfigFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::FromErrno(errno, "cannot read config file " + path);
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return Status::FromErrno(errno, "cannot read config file " + path);
  Result<Config> r = ParseConfig(buf.str(), path);
  if (!r.ok()) return r;
  Config& c = r.value();
  // A relative state_dir in a file means "next to this file", whatever the
  // working directory of whoever starts the daemon.
  if (!c.state_dir.empty() && c.state_dir[0] != '/') {
    std::error_code ec;
    std::filesystem::path dir = std::filesystem::absolute(path, ec).parent_path();
    if (ec) return Status::InvalidArgument("cannot resolve the directory of " + path);
    c.state_dir = Normal(dir / c.state_dir);
  }
  return r;
}

Status FinalizeConfig(Config& c) {
  if (c.state_dir.empty()) return KeyError(c, "state_dir", "must not be empty");
  {
    std::error_code ec;
    std::filesystem::path abs = std::filesystem::absolute(c.state_dir, ec);
    if (ec) return KeyError(c, "state_dir", "cannot make '" + c.state_dir + "' absolute: " + ec.message());
    c.state_dir = Normal(abs);
  }
  ResolveUnder(c.state_dir, c.control_socket, "control.sock");
  ResolveUnder(c.state_dir, c.nbd_socket, "nbd.sock");
  ResolveUnder(c.state_dir, c.disks_dir, "disks");
  ResolveUnder(c.state_dir, c.metadata_db, "metadata.db");
  ResolveUnder(c.state_dir, c.tracking_dir, "tracking");
  ResolveUnder(c.state_dir, c.staging_dir, "staging");
  if (!c.tls.dir.empty()) ResolveUnder(c.state_dir, c.tls.dir, "");
  if (!c.tls.psk_file.empty()) ResolveUnder(c.state_dir, c.tls.psk_file, "");
  if (c.nbd_tls.empty()) c.nbd_tls = c.tls.configured() ? "require" : "off";
  if (c.nbd_unix_tls.empty()) c.nbd_unix_tls = "off";
  for (auto [key, mode] : {std::pair<const char*, const std::string*>{"nbd.tls", &c.nbd_tls},
                           {"nbd.unix_tls", &c.nbd_unix_tls}}) {
    if (*mode != "off" && *mode != "allow" && *mode != "require") {
      return KeyError(c, key, "expected off, allow or require, got '" + *mode + "'");
    }
    if (*mode != "off" && !c.tls.configured()) {
      return KeyError(c, key, "'" + *mode + "' needs tls.dir or tls.psk_file");
    }
  }

  constexpr size_t kMaxSun = sizeof(sockaddr_un{}.sun_path) - 1;
  for (auto [key, path] : {std::pair<const char*, std::string*>{"control.socket", &c.control_socket},
                           {"nbd.socket", &c.nbd_socket}}) {
    if (path->size() > kMaxSun) {
      return KeyError(c, key, "socket path '" + *path + "' is " + std::to_string(path->size()) +
                                  " bytes; Unix sockets allow at most " + std::to_string(kMaxSun) +
                                  " (choose a shorter state_dir or socket path)");
    }
  }
  if (c.control_socket == c.nbd_socket) {
    return KeyError(c, "nbd.socket", "must differ from control.socket (both are '" + c.nbd_socket + "')");
  }
  for (auto [key, path] : {std::pair<const char*, std::string*>{"control.socket", &c.control_socket},
                           {"nbd.socket", &c.nbd_socket}, {"disks_dir", &c.disks_dir},
                           {"tracking_dir", &c.tracking_dir}, {"staging_dir", &c.staging_dir}}) {
    if (*path == c.metadata_db) {
      return KeyError(c, "metadata_db", std::string("must differ from ") + key + " ('" + *path + "')");
    }
  }
  // Each directory holds files named after disks: sharing one would mix them.
  {
    std::vector<std::pair<const char*, const std::string*>> dirs = {
        {"disks_dir", &c.disks_dir}, {"tracking_dir", &c.tracking_dir}, {"staging_dir", &c.staging_dir}};
    for (size_t i = 0; i < dirs.size(); ++i) {
      for (size_t j = i + 1; j < dirs.size(); ++j) {
        if (*dirs[i].second == *dirs[j].second) {
          return KeyError(c, dirs[j].first, std::string("must differ from ") + dirs[i].first + " ('" +
                                                *dirs[j].second + "')");
        }
      }
    }
  }
  if (c.consistency.hook_timeout_seconds < 1 || c.consistency.hook_timeout_seconds > kMaxHookTimeout) {
    return KeyError(c, "consistency.hook_timeout_seconds",
                    "must be a whole number from 1 to " + std::to_string(kMaxHookTimeout));
  }
  if (c.operations.retention_seconds < 1 || c.operations.retention_seconds > kMaxOperationRetention) {
    return KeyError(c, "operations.retention_seconds",
                    "must be a whole number from 1 to " + std::to_string(kMaxOperationRetention));
  }
  if (c.operations.max_count < 1 || c.operations.max_count > kMaxOperationCount) {
    return KeyError(c, "operations.max_count",
                    "must be a whole number from 1 to " + std::to_string(kMaxOperationCount));
  }
  if (c.control_socket_mode > 0777) return KeyError(c, "control.mode", "must be no larger than 0777");
  if (c.nbd_socket_mode > 0777) return KeyError(c, "nbd.mode", "must be no larger than 0777");
  if (c.nbd_tcp) {
    if (c.nbd_tcp->host.empty()) return KeyError(c, "nbd.tcp", "needs a host");
    if (c.nbd_tcp->port == 0) return KeyError(c, "nbd.tcp", "port must be from 1 to 65535");
  }
  if (c.access.listener.empty()) c.access.listener = c.nbd_tcp ? "tcp" : "unix";
  if (c.access.listener != "tcp" && c.access.listener != "unix") {
    return KeyError(c, "access.listener",
                    "must be 'tcp' or 'unix', got '" + c.access.listener + "'");
  }
  if (c.access.listener == "tcp" && !c.nbd_tcp) {
    return KeyError(c, "access.listener", "is 'tcp' but there is no TCP listener (nbd.tcp)");
  }
  if (c.access.host.empty() && c.nbd_tcp) c.access.host = c.nbd_tcp->host;
  if (c.access.max_duration_seconds < 1 || c.access.max_duration_seconds > kMaxGrantSeconds) {
    return KeyError(c, "access.max_duration_seconds",
                    "must be a whole number from 1 to " + std::to_string(kMaxGrantSeconds));
  }
  spdlog::level::level_enum level;
  if (Status st = ParseLogLevel(c.log_level, &level); !st.ok()) return KeyError(c, "log.level", st.message());
  if (c.io_queue_depth < 1 || c.io_queue_depth > kMaxQueueDepth) {
    return KeyError(c, "io.queue_depth", "must be a whole number from 1 to " + std::to_string(kMaxQueueDepth));
  }
  if (c.io_threads > kMaxThreads) {
    return KeyError(c, "io.threads", "must be a whole number from 0 to " + std::to_string(kMaxThreads));
  }

  std::set<std::string> names;
  int defaults = 0;
  for (size_t i = 0; i < c.regions.size(); ++i) {
    RegionConfig& r = c.regions[i];
    std::string key = "regions[" + std::to_string(i) + "]";
    if (Status st = Parser::ValidateRegionName(r.name); !st.ok()) return KeyError(c, key + ".name", st.message());
    if (!names.insert(r.name).second) return KeyError(c, key + ".name", "duplicate region name '" + r.name + "'");
    if (r.remote()) {
      if (!r.path.empty())
        return KeyError(c, key + ".peer", "a region has a path or a peer, not both");
      if (r.is_default) return KeyError(c, key + ".default", "a peer region cannot be the default");
      if (r.peer_region.empty()) r.peer_region = "local";
      if (c.tls.dir.empty())
        return KeyError(
            c, key + ".peer",
            "a peer region needs tls.dir (client-cert.pem, client-key.pem, ca-cert.pem)");
      continue;
    }
    if (r.path.empty() || r.path[0] != '/') return KeyError(c, key + ".path", "must be an absolute path");
    r.path = Normal(r.path);
    defaults += r.is_default ? 1 : 0;
  }
  if (c.peers_listen && c.tls.dir.empty()) {
    return KeyError(c, "peers.listen",
                    "needs tls.dir (ca-cert.pem, server-cert.pem, server-key.pem)");
  }
  if (defaults > 1) return KeyError(c, "regions", "only one region can be the default");
  if (c.regions.size() == 1) c.regions[0].is_default = true;  // the only one is the default
  if (c.regions.size() > 1 && defaults == 0) {
    return KeyError(c, "regions", "with several regions, one needs \"default: true\"");
  }
  for (size_t i = 0; i < c.adopt_paths.size(); ++i) {
    std::string& p = c.adopt_paths[i];
    if (p.empty() || p[0] != '/') {
      return KeyError(c, "adopt_paths", "entry " + std::to_string(i) + " must be an absolute path");
    }
    p = Normal(p);
  }
  if (c.regions.empty()) {
    // Restore points work out of the box: one store next to the other state.
    c.regions.push_back({"local", Normal(std::filesystem::path(c.state_dir) / "regions" / "local"), true});
  }
  return Status::Ok();
}

std::string FormatTcpAddress(const TcpAddress& a) {
  bool v6 = a.host.find(':') != std::string::npos;
  return (v6 ? "[" + a.host + "]" : a.host) + ":" + std::to_string(a.port);
}

std::string ConfigToYaml(const Config& c) {
  char mode[8], nbd_mode[8];
  std::snprintf(mode, sizeof mode, "%04o", c.control_socket_mode);
  std::snprintf(nbd_mode, sizeof nbd_mode, "%04o", c.nbd_socket_mode);
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "state_dir" << YAML::Value << c.state_dir;
  out << YAML::Key << "disks_dir" << YAML::Value << c.disks_dir;
  out << YAML::Key << "metadata_db" << YAML::Value << c.metadata_db;
  out << YAML::Key << "tracking_dir" << YAML::Value << c.tracking_dir;
  out << YAML::Key << "staging_dir" << YAML::Value << c.staging_dir;
  out << YAML::Key << "control" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "socket" << YAML::Value << c.control_socket;
  out << YAML::Key << "mode" << YAML::Value << YAML::DoubleQuoted << mode;
  out << YAML::EndMap;
  out << YAML::Key << "nbd" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "socket" << YAML::Value << c.nbd_socket;
  out << YAML::Key << "mode" << YAML::Value << YAML::DoubleQuoted << nbd_mode;
  out << YAML::Key << "tcp" << YAML::Value;
  if (c.nbd_tcp) {
    out << YAML::DoubleQuoted << FormatTcpAddress(*c.nbd_tcp);
  } else {
    out << YAML::Null;
  }
  out << YAML::Key << "tls" << YAML::Value << c.nbd_tls;
  out << YAML::Key << "unix_tls" << YAML::Value << c.nbd_unix_tls;
  out << YAML::EndMap;
  out << YAML::Key << "tls" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "dir" << YAML::Value << YAML::DoubleQuoted << c.tls.dir;
  out << YAML::Key << "psk_file" << YAML::Value << YAML::DoubleQuoted << c.tls.psk_file;
  out << YAML::Key << "verify_peer" << YAML::Value << c.tls.verify_peer;
  out << YAML::EndMap;
  out << YAML::Key << "log" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "level" << YAML::Value << c.log_level;
  out << YAML::EndMap;
  out << YAML::Key << "io" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "queue_depth" << YAML::Value << c.io_queue_depth;
  out << YAML::Key << "threads" << YAML::Value << c.io_threads;
  out << YAML::Key << "direct" << YAML::Value << c.direct_io;
  out << YAML::EndMap;
  out << YAML::Key << "store" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "open_packs" << YAML::Value << c.store_open_packs;
  out << YAML::EndMap;
  out << YAML::Key << "regions" << YAML::Value;
  if (c.regions.empty()) {
    out << YAML::Flow << YAML::BeginSeq << YAML::EndSeq;
  } else {
    out << YAML::BeginSeq;
    for (const auto& r : c.regions) {
      out << YAML::BeginMap;
      out << YAML::Key << "name" << YAML::Value << r.name;
      if (!r.remote()) out << YAML::Key << "path" << YAML::Value << r.path;
      out << YAML::Key << "default" << YAML::Value << r.is_default;
      if (r.remote()) {
        out << YAML::Key << "peer" << YAML::Value << YAML::DoubleQuoted << r.peer;
        out << YAML::Key << "peer_region" << YAML::Value << r.peer_region;
      }
      out << YAML::EndMap;
    }
    out << YAML::EndSeq;
  }
  out << YAML::Key << "peers" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "listen" << YAML::Value;
  if (c.peers_listen) {
    out << YAML::DoubleQuoted << FormatTcpAddress(*c.peers_listen);
  } else {
    out << YAML::Null;
  }
  out << YAML::Key << "deadline_seconds" << YAML::Value << c.peers_deadline_seconds;
  out << YAML::EndMap;
  out << YAML::Key << "adopt_paths" << YAML::Value << YAML::Flow << YAML::BeginSeq;
  for (const auto& p : c.adopt_paths) out << p;
  out << YAML::EndSeq;
  const ConsistencyConfig& cc = c.consistency;
  out << YAML::Key << "consistency" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "hook_timeout_seconds" << YAML::Value << cc.hook_timeout_seconds;
  out << YAML::Key << "freeze" << YAML::Value << YAML::DoubleQuoted << cc.defaults.freeze;
  out << YAML::Key << "thaw" << YAML::Value << YAML::DoubleQuoted << cc.defaults.thaw;
  out << YAML::Key << "vms" << YAML::Value;
  if (cc.vms.empty()) {
    out << YAML::Flow << YAML::BeginMap << YAML::EndMap;
  } else {
    out << YAML::BeginMap;
    for (const auto& [vm, hooks] : cc.vms) {
      out << YAML::Key << vm << YAML::Value << YAML::BeginMap;
      if (hooks.freeze) out << YAML::Key << "freeze" << YAML::Value << YAML::DoubleQuoted << *hooks.freeze;
      if (hooks.thaw) out << YAML::Key << "thaw" << YAML::Value << YAML::DoubleQuoted << *hooks.thaw;
      out << YAML::EndMap;
    }
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  out << YAML::Key << "operations" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "retention_seconds" << YAML::Value << c.operations.retention_seconds;
  out << YAML::Key << "max_count" << YAML::Value << c.operations.max_count;
  out << YAML::EndMap;
  out << YAML::Key << "access" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "listener" << YAML::Value << c.access.listener;
  out << YAML::Key << "host" << YAML::Value << YAML::DoubleQuoted << c.access.host;
  out << YAML::Key << "max_duration_seconds" << YAML::Value << c.access.max_duration_seconds;
  out << YAML::Key << "tcp_grants_only" << YAML::Value << c.access.tcp_grants_only;
  out << YAML::EndMap;
  out << YAML::Key << "ublk" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "queues" << YAML::Value << c.ublk_queues;
  out << YAML::Key << "depth" << YAML::Value << c.ublk_depth;
  out << YAML::Key << "user_copy" << YAML::Value << c.ublk_user_copy;
  out << YAML::Key << "zero_copy" << YAML::Value << c.ublk_zero_copy;
  out << YAML::Key << "taskrun" << YAML::Value << c.ublk_taskrun;
  out << YAML::Key << "pin_queues" << YAML::Value << c.ublk_pin_queues;
  out << YAML::Key << "max_io_bytes" << YAML::Value << c.ublk_max_io_bytes;
  out << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

// Every key the parser (Parser::Document and the walkers it calls) accepts, in
// the parser's order, one a line: a key added there is added here in the same
// change (config_test reads the parser's own key lists back and fails otherwise).
const std::vector<std::string>& ConfigKeys() {
  static const std::vector<std::string> kKeys = {
      "state_dir",
      "disks_dir",
      "metadata_db",
      "tracking_dir",
      "staging_dir",
      "control.socket",
      "control.mode",
      "nbd.socket",
      "nbd.mode",
      "nbd.tcp",
      "nbd.tls",
      "nbd.unix_tls",
      "log.level",
      "io.queue_depth",
      "io.threads",
      "io.direct",
      "regions",
      "regions[].name",
      "regions[].path",
      "regions[].default",
      "adopt_paths",
      "store.open_packs",
      "consistency.hook_timeout_seconds",
      "consistency.freeze",
      "consistency.thaw",
      "consistency.vms",
      "consistency.vms.{vm}",
      "consistency.vms.{vm}.freeze",
      "consistency.vms.{vm}.thaw",
      "operations.retention_seconds",
      "operations.max_count",
      "tls.dir",
      "tls.psk_file",
      "tls.verify_peer",
      "access.listener",
      "access.host",
      "access.max_duration_seconds",
      "access.tcp_grants_only",
      "ublk.queues",
      "ublk.depth",
      "ublk.user_copy",
      "ublk.zero_copy",
      "ublk.taskrun",
      "ublk.pin_queues",
      "ublk.max_io_bytes",

      "regions[].peer",
      "regions[].peer_region",
      "peers.listen",
      "peers.deadline_seconds",
  };
  return kKeys;
}

const RegionConfig* DefaultRegion(const Config& c) {
  for (const auto& r : c.regions) {
    if (r.is_default) return &r;
  }
  return c.regions.size() == 1 ? &c.regions[0] : nullptr;
}

HookConfig EffectiveHooks(const ConsistencyConfig& cc, const std::string& vm) {
  HookConfig h = cc.defaults;
  auto it = cc.vms.find(vm);
  if (it != cc.vms.end()) {
    if (it->second.freeze) h.freeze = *it->second.freeze;
    if (it->second.thaw) h.thaw = *it->second.thaw;
  }
  return h;
}

}  // namespace rpoint
