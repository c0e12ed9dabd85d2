// Tests of config/: every key, every error (naming key and line), the example file.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "config/config.h"

using namespace rpoint;
namespace fs = std::filesystem;

namespace {

Config Parse(const std::string& text) {
  Result<Config> r = ParseConfig(text, "t.yaml");
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return r.value();
}

// The error message of a config that must be rejected.
std::string Error(const std::string& text) {
  Result<Config> r = ParseConfig(text, "t.yaml");
  REQUIRE_MESSAGE(!r.ok(), "accepted: " << text);
  CHECK(r.status().code() == Code::kInvalidArgument);
  return r.status().message();
}

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Checks that an error names the place ("t.yaml:<line>:") and the key.
void ExpectError(const std::string& text, const std::string& where, const std::string& key,
                 const std::string& detail = "") {
  std::string msg = Error(text);
  INFO("message: " << msg);
  CHECK(msg.rfind("t.yaml:" + where, 0) == 0);
  CHECK(Contains(msg, key + ": "));
  if (!detail.empty()) CHECK(Contains(msg, detail));
}

Config Finalized(const std::string& text) {
  Config c = Parse(text);
  Status st = FinalizeConfig(c);
  REQUIRE_MESSAGE(st.ok(), st.ToString());
  return c;
}

// The source tree: tests run from the build directory, which lives inside it.
fs::path SourceFile(const std::string& rel) {
  if (const char* env = std::getenv("RPOINTD_SOURCE_DIR")) return fs::path(env) / rel;
  fs::path f(__FILE__);
  if (f.is_absolute()) return f.parent_path().parent_path().parent_path() / rel;
  for (fs::path d = fs::current_path(); !d.empty(); d = d.parent_path()) {
    if (fs::exists(d / rel)) return d / rel;
    if (d == d.parent_path()) break;
  }
  return rel;
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "config_test.XXXXXX").string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() { fs::remove_all(path); }
};

}  // namespace

TEST_CASE("empty input gives the built-in defaults") {
  for (const char* text : {"", "# only a comment\n", "---\n"}) {
    Config c = Parse(text);
    CHECK(c.state_dir == "/var/lib/rpointd");
    CHECK(c.control_socket.empty());
    CHECK(c.control_socket_mode == 0660);
    CHECK(c.nbd_socket_mode == 0660);
    CHECK(!c.nbd_tcp);
    CHECK(c.log_level == "info");
    CHECK(c.io_queue_depth == 256);
    CHECK(c.io_threads == 0);
    CHECK(!c.direct_io);
    CHECK(c.regions.empty());
  }
}

TEST_CASE("every key is parsed") {
  Config c = Parse(R"(
state_dir: /srv/rp
disks_dir: /srv/disks
metadata_db: /srv/meta.db
control:
  socket: /run/rp/c.sock
  mode: "0600"
nbd:
  socket: /run/rp/n.sock
  mode: 0640
  tcp: "127.0.0.1:10900"
log:
  level: debug
io:
  queue_depth: 1024
  threads: 3
  direct: true
regions:
  - name: local
    path: /srv/regions/local
  - name: nas
    path: /mnt/nas
    default: yes
)");
  CHECK(c.state_dir == "/srv/rp");
  CHECK(c.disks_dir == "/srv/disks");
  CHECK(c.metadata_db == "/srv/meta.db");
  CHECK(c.control_socket == "/run/rp/c.sock");
  CHECK(c.control_socket_mode == 0600);
  CHECK(c.nbd_socket == "/run/rp/n.sock");
  CHECK(c.nbd_socket_mode == 0640);
  REQUIRE(c.nbd_tcp);
  CHECK(c.nbd_tcp->host == "127.0.0.1");
  CHECK(c.nbd_tcp->port == 10900);
  CHECK(c.log_level == "debug");
  CHECK(c.io_queue_depth == 1024);
  CHECK(c.io_threads == 3);
  CHECK(c.direct_io);
  REQUIRE(c.regions.size() == 2);
  CHECK(c.regions[0].name == "local");
  CHECK(c.regions[0].path == "/srv/regions/local");
  CHECK(!c.regions[0].is_default);
  CHECK(c.regions[1].name == "nas");
  CHECK(c.regions[1].is_default);
  CHECK(c.origins.at("io.queue_depth") == "t.yaml:15:16");
  CHECK(c.origins.at("regions[1].default") == "t.yaml:23:14");
}

TEST_CASE("every documented key is accepted: ConfigKeys matches the parser") {
  // A config naming every key in ConfigKeys() parses: no key is listed that the parser rejects.
  std::string text =
      "state_dir: /a\ndisks_dir: d\nmetadata_db: m\ncontrol: {socket: c, mode: '0600'}\n"
      "nbd: {socket: n, mode: '0600', tcp: 'localhost:1', tls: allow, unix_tls: off}\n"
      "tls: {dir: pki, psk_file: k.psk, verify_peer: false}\nlog: {level: warn}\n"
      "io: {queue_depth: 1, threads: 1, direct: false}\n"
      "regions: [{name: r, path: /r, default: true}]\n"
      "tracking_dir: t\nstaging_dir: s\nadopt_paths: [/img]\nstore: {open_packs: 16}\n"
      "consistency: {hook_timeout_seconds: 5, freeze: f, thaw: t, vms: {web1: {freeze: a, thaw: "
      "b}}}\n"
      "operations: {retention_seconds: 60, max_count: 5}\n"
      "access: {listener: tcp, host: h, max_duration_seconds: 60, tcp_grants_only: true}\n"
      "ublk: {queues: 2, depth: 64, user_copy: false, taskrun: coop, pin_queues: false,\n"
      "  max_io_bytes: 65536, zero_copy: off}\n"
      "peers: {listen: 'localhost:2', deadline_seconds: 30}\n";
  // A peer region has no path: its keys are checked on a second entry.
  text.replace(text.find("default: true}]"), 15,
               "default: true}, {name: f, peer: 'h:1', peer_region: x}]");
  Config c = Parse(text);
  for (const std::string& key : ConfigKeys()) {
    std::string k = key;
    const bool peer_key = k.rfind("regions[].peer", 0) == 0;
    if (auto p = k.find("[]"); p != std::string::npos) k.replace(p, 2, peer_key ? "[1]" : "[0]");
    if (auto p = k.find("{vm}"); p != std::string::npos) k.replace(p, 4, "web1");
    INFO(key);
    CHECK(c.origins.count(k) == 1);
  }
  // ...and the parser accepts no key that is not listed (sections aside).
  for (const auto& [key, where] : c.origins) {
    std::string k = key;
    if (auto p = k.find("[0]"); p != std::string::npos) k.replace(p, 3, "[]");
    if (auto p = k.find("[1]"); p != std::string::npos) k.replace(p, 3, "[]");
    if (auto p = k.find("web1"); p != std::string::npos) k.replace(p, 4, "{vm}");
    bool section = k == "control" || k == "nbd" || k == "log" || k == "io" || k == "consistency" ||
                   k == "operations" || k == "store" || k == "tls" || k == "access" ||
                   k == "ublk" ||
                   k == "peers";
    INFO(key);
    CHECK((section || std::find(ConfigKeys().begin(), ConfigKeys().end(), k) != ConfigKeys().end()));
  }
}

// The parser's own tables, read back from its "expected one of" message for an
// unknown key in each mapping, must equal ConfigKeys()'s children of that
// mapping: a key added to the parser but not to ConfigKeys() (or the reverse)
// fails here even when no test config names it.
TEST_CASE("ConfigKeys lists exactly the keys of every mapping the parser walks") {
  struct Mapping {
    std::string prefix;  // as in ConfigKeys(): "" top level, "io", "regions[]"
    std::string yaml;    // a config with the unknown key "zzz" in that mapping
  };
  for (const Mapping& m : std::vector<Mapping>{
           {"", "zzz: 1\n"},
           {"control", "control: {zzz: 1}\n"},
           {"nbd", "nbd: {zzz: 1}\n"},
           {"log", "log: {zzz: 1}\n"},
           {"io", "io: {zzz: 1}\n"},
           {"regions[]", "regions: [{zzz: 1}]\n"},
           {"consistency", "consistency: {zzz: 1}\n"},
           {"consistency.vms.{vm}", "consistency: {vms: {web1: {zzz: 1}}}\n"},
       }) {
    INFO(m.yaml);
    Result<Config> r = ParseConfig(m.yaml, "t.yaml");
    REQUIRE(!r.ok());
    std::string msg = r.status().message();
    const std::string marker = "expected one of: ";
    size_t at = msg.find(marker);
    REQUIRE(at != std::string::npos);
    std::vector<std::string> parser;
    std::string rest = msg.substr(at + marker.size());
    for (size_t pos = 0;;) {
      size_t comma = rest.find(", ", pos);
      parser.push_back(rest.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
      if (comma == std::string::npos) break;
      pos = comma + 2;
    }
    std::vector<std::string> listed;
    std::string head = m.prefix.empty() ? "" : m.prefix + ".";
    for (const std::string& key : ConfigKeys()) {
      if (key.compare(0, head.size(), head) != 0) continue;
      std::string child = key.substr(head.size());
      std::string name = child.substr(0, child.find_first_of(".["));
      if (name.empty() || name == "{vm}") continue;
      if (std::find(listed.begin(), listed.end(), name) == listed.end()) listed.push_back(name);
    }
    std::sort(parser.begin(), parser.end());
    std::sort(listed.begin(), listed.end());
    CHECK(parser == listed);
  }
}

TEST_CASE("null values mean the default") {
  Config c = Parse("control:\n  socket:\n  mode: ~\nnbd:\n  tcp: null\nio:\nlog: ~\nregions:\n");
  CHECK(c.control_socket.empty());
  CHECK(c.control_socket_mode == 0660);
  CHECK(!c.nbd_tcp);
  CHECK(c.io_queue_depth == 256);
  CHECK(Parse("nbd: {tcp: ''}").nbd_tcp == std::nullopt);
}

TEST_CASE("adopt_paths: a list of absolute directories, default /dev and two image dirs") {
  Config d = Parse("");
  CHECK(d.adopt_paths ==
        std::vector<std::string>{"/dev", "/srv/vm-images", "/var/lib/libvirt/images"});
  CHECK(Parse("adopt_paths: [/img/, /x//y]").adopt_paths ==
        std::vector<std::string>{"/img/", "/x//y"});
  CHECK(Parse("adopt_paths: []").adopt_paths.empty());
  ExpectError("adopt_paths:\n  - img\n", "2:5:", "adopt_paths[0]", "absolute");
  ExpectError("adopt_paths: /img\n", "1:14:", "adopt_paths", "list");
}

TEST_CASE("modes are octal") {
  CHECK(Parse("control: {mode: 0660}").control_socket_mode == 0660);
  CHECK(Parse("control: {mode: '660'}").control_socket_mode == 0660);
  CHECK(Parse("control: {mode: 0o600}").control_socket_mode == 0600);
  CHECK(Parse("control: {mode: '0'}").control_socket_mode == 0);
  ExpectError("control:\n  mode: 0689\n", "2:9:", "control.mode", "octal");
  ExpectError("control:\n  mode: rw-rw----\n", "2:9:", "control.mode", "octal");
  ExpectError("control:\n  mode: 01777\n", "2:9:", "control.mode", "0777");
  ExpectError("control:\n  mode: ''\n", "2:9:", "control.mode", "octal");
  ExpectError("nbd:\n  mode: [1]\n", "2:9:", "nbd.mode", "got a list");
}

TEST_CASE("nbd.tcp addresses") {
  auto tcp = [](const std::string& v) { return *Parse("nbd: {tcp: '" + v + "'}").nbd_tcp; };
  CHECK(tcp("127.0.0.1:10809").host == "127.0.0.1");
  CHECK(tcp("localhost:1").port == 1);
  CHECK(tcp("localhost:65535").port == 65535);
  CHECK(tcp("[::1]:2000").host == "::1");
  CHECK(tcp("[::1]:2000").port == 2000);
  CHECK(tcp("[::]").port == 10809);
  CHECK(tcp("example.org").port == 10809);
  CHECK(FormatTcpAddress(tcp("[::1]:2000")) == "[::1]:2000");
  CHECK(FormatTcpAddress(tcp("0.0.0.0:5")) == "0.0.0.0:5");

  const char* bad[][2] = {
      {"127.0.0.1:0", "port"},      {"127.0.0.1:65536", "port"}, {"127.0.0.1:http", "port"},
      {"127.0.0.1:", "missing port"}, {"::1", "brackets"},        {"[::1", "']'"},
      {"[::1]x", "':'"},            {"[1.2.3.4]:5", "IPv6"},     {":10809", "host"},
      {"10809", "host:port"},       {"a b:1", "bad host"},       {"[::1]:", "missing port"},
  };
  for (auto& b : bad) {
    ExpectError(std::string("nbd:\n  tcp: '") + b[0] + "'\n", "2:8:", "nbd.tcp", b[1]);
  }
  ExpectError("nbd:\n  tcp: {host: x}\n", "2:8:", "nbd.tcp", "got a mapping");
}

TEST_CASE("numbers and booleans") {
  CHECK(Parse("io: {queue_depth: 1}").io_queue_depth == 1);
  CHECK(Parse("io: {queue_depth: 32768}").io_queue_depth == 32768);
  CHECK(Parse("io: {threads: 1024}").io_threads == 1024);
  ExpectError("io:\n  queue_depth: 0\n", "2:16:", "io.queue_depth", "from 1 to 32768");
  ExpectError("io:\n  queue_depth: 32769\n", "2:16:", "io.queue_depth", "from 1 to 32768");
  ExpectError("io:\n  queue_depth: -1\n", "2:16:", "io.queue_depth");
  ExpectError("io:\n  queue_depth: 1.5\n", "2:16:", "io.queue_depth");
  ExpectError("io:\n  queue_depth: 99999999999999999999\n", "2:16:", "io.queue_depth");
  ExpectError("io:\n  queue_depth: lots\n", "2:16:", "io.queue_depth");
  ExpectError("io:\n  threads: 1025\n", "2:12:", "io.threads", "from 0 to 1024");
  CHECK(Parse("").ublk_queues == 0);  // one per CPU
  CHECK(Parse("").ublk_depth == 128);
  CHECK_FALSE(Parse("").ublk_user_copy);
  CHECK(Parse("ublk:\n  user_copy: true\n").ublk_user_copy);
  CHECK(Parse("").ublk_zero_copy == "auto");
  CHECK(Parse("ublk: {zero_copy: off}").ublk_zero_copy == "off");
  CHECK(Parse("ublk: {zero_copy: \"on\"}").ublk_zero_copy == "on");
  ExpectError("ublk:\n  zero_copy: yes please\n", "2:14:", "ublk.zero_copy",
              "expected auto, on or off");
  CHECK(Parse("").ublk_taskrun == "plain");
  CHECK(Parse("ublk: {taskrun: defer}").ublk_taskrun == "defer");
  CHECK_FALSE(Parse("").ublk_pin_queues);
  ExpectError("ublk:\n  taskrun: lazy\n", "2:12:", "ublk.taskrun", "expected defer, coop or plain");
  CHECK(Parse("ublk: {queues: 4, depth: 1024}").ublk_depth == 1024);
  ExpectError("ublk:\n  depth: 0\n", "2:10:", "ublk.depth", "from 1 to 1024");
  ExpectError("ublk:\n  depth: 1025\n", "2:10:", "ublk.depth", "from 1 to 1024");
  ExpectError("ublk:\n  queues: 65\n", "2:11:", "ublk.queues", "from 0 to 64");
}

TEST_CASE("ublk.max_io_bytes: a power of two from 4 KiB to 32 MiB, 1 MiB by default") {
  CHECK(Parse("").ublk_max_io_bytes == 1024 * 1024);
  CHECK(Parse("ublk: {max_io_bytes: 4096}").ublk_max_io_bytes == 4096);
  CHECK(Parse("ublk: {max_io_bytes: 524288}").ublk_max_io_bytes == 512 * 1024);
  CHECK(Parse("ublk: {max_io_bytes: 33554432}").ublk_max_io_bytes == 32u << 20);
  CHECK(kMaxUblkIoBytes == 32u << 20);
  const char* range = "from 4096 to 33554432";
  ExpectError("ublk:\n  max_io_bytes: 2048\n", "2:17:", "ublk.max_io_bytes", range);
  ExpectError("ublk:\n  max_io_bytes: 67108864\n", "2:17:", "ublk.max_io_bytes", range);
  ExpectError("ublk:\n  max_io_bytes: 3145728\n", "2:17:", "ublk.max_io_bytes", "power of two");
  ExpectError("ublk:\n  max_io_bytes: 4097\n", "2:17:", "ublk.max_io_bytes", "power of two");
  ExpectError("ublk:\n  max_io_bytes: 1M\n", "2:17:", "ublk.max_io_bytes", "whole number");
  for (const char* t : {"true", "True", "yes", "on"}) CHECK(Parse(std::string("io: {direct: ") + t + "}").direct_io);
  for (const char* f : {"false", "no", "off"}) CHECK(!Parse(std::string("io: {direct: ") + f + "}").direct_io);
  ExpectError("io:\n  direct: maybe\n", "2:11:", "io.direct", "true or false");
  ExpectError("io:\n  direct: [true]\n", "2:11:", "io.direct", "got a list");
}

TEST_CASE("log.level") {
  for (const char* l : {"trace", "debug", "info", "warn", "error", "critical", "off"}) {
    CHECK(Parse(std::string("log: {level: ") + l + "}").log_level == l);
  }
  ExpectError("log:\n  level: loud\n", "2:10:", "log.level", "unknown log level");
}

TEST_CASE("strings and structure") {
  ExpectError("state_dir: ''\n", "1:12:", "state_dir", "must not be empty");
  ExpectError("state_dir: [a]\n", "1:12:", "state_dir", "expected a string");
  ExpectError("disks_dir: {a: 1}\n", "1:12:", "disks_dir", "got a mapping");
  ExpectError("control: /x\n", "1:10:", "control", "expected a mapping");
  ExpectError("io: [1]\n", "1:5:", "io", "expected a mapping");
  std::string top = Error("- a\n- b\n");
  CHECK(Contains(top, "t.yaml:1:1:"));
  CHECK(Contains(top, "expected a mapping"));
}

TEST_CASE("unknown and duplicate keys") {
  ExpectError("state_dir: /a\nstate_dri: /b\n", "2:1:", "state_dri", "did you mean 'state_dir'");
  ExpectError("io:\n  queue_dept: 3\n", "2:3:", "io.queue_dept", "did you mean 'queue_depth'");
  std::string msg = Error("io:\n  zzz: 3\n");
  CHECK(Contains(msg, "expected one of: queue_depth, threads, direct"));
  CHECK(!Contains(msg, "did you mean"));
  ExpectError("log:\n  level: info\n  level: debug\n", "3:3:", "log.level", "duplicate");
  ExpectError("regions:\n  - name: a\n    path: /a\n    colour: red\n", "4:5:", "regions[0].colour", "unknown key");
  ExpectError("? [a]\n: 1\n", "1:3:", "", "keys must be plain words");
}

TEST_CASE("YAML syntax errors name the line") {
  std::string msg = Error("io:\n  queue_depth: 4\n bad: [\n");
  CHECK(msg.rfind("t.yaml:", 0) == 0);
  CHECK(Contains(msg, "YAML syntax error"));
  msg = Error("a: 1\n---\nb: 2\n");
  CHECK(Contains(msg, "only one YAML document"));
}

TEST_CASE("regions") {
  Config one = Finalized("regions:\n  - {name: local, path: /srv/r/}\n");
  REQUIRE(one.regions.size() == 1);
  CHECK(one.regions[0].is_default);  // the only region is the default
  CHECK(one.regions[0].path == "/srv/r");
  REQUIRE(DefaultRegion(one) != nullptr);
  CHECK(DefaultRegion(one)->name == "local");
  // No regions configured: "local" under state_dir is the default.
  Config none = Finalized("state_dir: /s\n");
  REQUIRE(none.regions.size() == 1);
  CHECK(none.regions[0].name == "local");
  CHECK(none.regions[0].path == "/s/regions/local");
  CHECK(none.regions[0].is_default);
  CHECK(DefaultRegion(none) == &none.regions[0]);
  Config twice = none;
  REQUIRE(FinalizeConfig(twice).ok());
  CHECK(twice.regions.size() == 1);

  ExpectError("regions:\n  - {name: a, path: /a}\n  - {name: a, path: /b}\n", "3:12:", "regions[1].name",
              "duplicate region name 'a'");
  ExpectError("regions:\n  - name: a\n    path: rel/dir\n", "3:11:", "regions[0].path", "absolute");
  ExpectError("regions:\n  - name: .hidden\n    path: /a\n", "2:11:", "regions[0].name", "start with");
  ExpectError("regions:\n  - name: 'a b'\n    path: /a\n", "2:11:", "regions[0].name", "may only contain");
  ExpectError("regions:\n  - name: ''\n    path: /a\n", "2:11:", "regions[0].name", "1-63");
  ExpectError("regions:\n  - path: /a\n", "2:5:", "regions[0].name", "missing");
  ExpectError("regions:\n  - name: a\n", "2:5:", "regions[0].path", "missing");
  ExpectError("regions:\n  - {name: a, path: /a, default: true}\n  - {name: b, path: /b, default: true}\n",
              "3:5:", "regions[1].default", "only one region");
  ExpectError("regions:\n  - {name: a, path: /a}\n  - {name: b, path: /b}\n", "1:", "regions",
              "default: true");
  ExpectError("regions: /a\n", "1:10:", "regions", "expected a list");
  ExpectError("regions:\n  - /a\n", "2:5:", "regions[0]", "expected a mapping");
}

TEST_CASE("consistency hooks") {
  Config c = Parse(R"(
consistency:
  hook_timeout_seconds: 30
  freeze: "virsh domfsfreeze $RPOINT_VM"
  thaw: "virsh domfsthaw $RPOINT_VM"
  vms:
    web1: {freeze: "/usr/local/bin/freeze-web"}
    db.1:
      freeze: ""
      thaw: ~
    bare:
)");
  CHECK(c.consistency.hook_timeout_seconds == 30);
  CHECK(c.consistency.defaults.freeze == "virsh domfsfreeze $RPOINT_VM");
  REQUIRE(c.consistency.vms.size() == 3);
  HookConfig web = EffectiveHooks(c.consistency, "web1");
  CHECK(web.freeze == "/usr/local/bin/freeze-web");
  CHECK(web.thaw == "virsh domfsthaw $RPOINT_VM");  // falls back to the top-level thaw
  CHECK(EffectiveHooks(c.consistency, "db.1").freeze.empty());  // "" turns the hook off
  CHECK(EffectiveHooks(c.consistency, "db.1").thaw == "virsh domfsthaw $RPOINT_VM");
  CHECK(EffectiveHooks(c.consistency, "bare").freeze == "virsh domfsfreeze $RPOINT_VM");
  CHECK(EffectiveHooks(c.consistency, "other").thaw == "virsh domfsthaw $RPOINT_VM");
  CHECK(EffectiveHooks(Parse("").consistency, "x").freeze.empty());
  CHECK(c.origins.at("consistency.vms.web1.freeze") == "t.yaml:7:20");

  ExpectError("consistency:\n  freez: x\n", "2:3:", "consistency.freez", "did you mean 'freeze'");
  ExpectError("consistency:\n  hook_timeout_seconds: 0\n", "2:25:", "consistency.hook_timeout_seconds",
              "from 1 to 3600");
  ExpectError("consistency:\n  vms:\n    web1: {freeze: a, thw: b}\n", "3:23:", "consistency.vms.web1.thw",
              "unknown key");
  ExpectError("consistency:\n  vms:\n    'a b': {freeze: a}\n", "3:5:", "consistency.vms.a b",
              "VM name may only contain");
  ExpectError("consistency:\n  vms: [a]\n", "2:8:", "consistency.vms", "expected a mapping");
  ExpectError("consistency:\n  vms:\n    web1: x\n", "3:11:", "consistency.vms.web1", "expected a mapping");
  ExpectError("consistency: x\n", "1:14:", "consistency", "expected a mapping");

  // Round trip through ConfigToYaml.
  Config f = c;
  REQUIRE(FinalizeConfig(f).ok());
  Config back = Parse(ConfigToYaml(f));
  CHECK(back.consistency.hook_timeout_seconds == 30);
  CHECK(back.consistency.defaults.thaw == "virsh domfsthaw $RPOINT_VM");
  REQUIRE(back.consistency.vms.count("db.1") == 1);
  CHECK(back.consistency.vms["db.1"].freeze == std::optional<std::string>(""));
  CHECK(!back.consistency.vms["db.1"].thaw);
  CHECK(back.consistency.vms["web1"].freeze == std::optional<std::string>("/usr/local/bin/freeze-web"));
}

TEST_CASE("FinalizeConfig fills defaults from state_dir") {
  Config c = Finalized("state_dir: /srv/rp/\n");
  CHECK(c.state_dir == "/srv/rp");
  CHECK(c.control_socket == "/srv/rp/control.sock");
  CHECK(c.nbd_socket == "/srv/rp/nbd.sock");
  CHECK(c.disks_dir == "/srv/rp/disks");
  CHECK(c.metadata_db == "/srv/rp/metadata.db");
  CHECK(c.tracking_dir == "/srv/rp/tracking");
  CHECK(c.staging_dir == "/srv/rp/staging");
  CHECK(c.consistency.hook_timeout_seconds == 60);

  // Relative paths are under state_dir; absolute ones stay; idempotent.
  Config d = Finalized("state_dir: /s\ncontrol: {socket: run/c.sock}\nnbd: {socket: /n.sock}\n"
                       "disks_dir: ../d\nmetadata_db: ./m.db\n");
  CHECK(d.control_socket == "/s/run/c.sock");
  CHECK(d.nbd_socket == "/n.sock");
  CHECK(d.disks_dir == "/d");
  CHECK(d.metadata_db == "/s/m.db");
  Config again = d;
  REQUIRE(FinalizeConfig(again).ok());
  CHECK(again.control_socket == d.control_socket);
  CHECK(again.disks_dir == d.disks_dir);

  // A relative state_dir from a string or flag is relative to the working directory.
  Config rel = Finalized("state_dir: some/where\n");
  CHECK(rel.state_dir == (fs::current_path() / "some/where").string());
  CHECK(rel.control_socket == rel.state_dir + "/control.sock");
}

TEST_CASE("FinalizeConfig errors name the key and where it was set") {
  Config c = Parse("state_dir: /s\ncontrol:\n  socket: /x.sock\nnbd:\n  socket: /x.sock\n");
  Status st = FinalizeConfig(c);
  REQUIRE(!st.ok());
  CHECK(st.message().rfind("t.yaml:5:11: nbd.socket: ", 0) == 0);

  Config longp = Parse("state_dir: /" + std::string(120, 'a') + "\n");
  st = FinalizeConfig(longp);
  REQUIRE(!st.ok());
  CHECK(Contains(st.message(), "control.socket: "));
  CHECK(Contains(st.message(), "at most 107"));

  Config td = Parse("tracking_dir: disks\n");
  st = FinalizeConfig(td);
  REQUIRE(!st.ok());
  CHECK(st.message().rfind("t.yaml:1:15: tracking_dir: must differ from disks_dir", 0) == 0);

  Config m = Parse("metadata_db: disks\n");
  st = FinalizeConfig(m);
  REQUIRE(!st.ok());
  CHECK(st.message().rfind("t.yaml:1:14: metadata_db: ", 0) == 0);

  // An override from the command line carries its own origin.
  Config flag;
  flag.log_level = "chatty";
  flag.origins["log.level"] = "--log-level";
  st = FinalizeConfig(flag);
  REQUIRE(!st.ok());
  CHECK(st.message().rfind("--log-level: log.level: unknown log level", 0) == 0);

  Config empty;
  empty.state_dir = "";
  CHECK(!FinalizeConfig(empty).ok());
  Config q;
  q.io_queue_depth = 0;
  CHECK(Contains(FinalizeConfig(q).message(), "io.queue_depth"));
}

TEST_CASE("ConfigToYaml round-trips") {
  Config c = Finalized(R"(
state_dir: /srv/rp
nbd: {tcp: "[::1]:7000", mode: "0600"}
control: {mode: "0640"}
io: {queue_depth: 64, threads: 2, direct: true}
log: {level: warn}
regions: [{name: a, path: /a}, {name: b, path: "/b c", default: true}]
)");
  std::string yaml = ConfigToYaml(c);
  INFO(yaml);
  Config back = Parse(yaml);
  REQUIRE(FinalizeConfig(back).ok());
  CHECK(back.state_dir == c.state_dir);
  CHECK(back.control_socket == c.control_socket);
  CHECK(back.control_socket_mode == 0640);
  CHECK(back.nbd_socket == c.nbd_socket);
  CHECK(back.nbd_socket_mode == 0600);
  REQUIRE(back.nbd_tcp);
  CHECK(back.nbd_tcp->host == "::1");
  CHECK(back.nbd_tcp->port == 7000);
  CHECK(back.io_queue_depth == 64);
  CHECK(back.io_threads == 2);
  CHECK(back.direct_io);
  CHECK(back.log_level == "warn");
  CHECK(back.disks_dir == c.disks_dir);
  CHECK(back.metadata_db == c.metadata_db);
  REQUIRE(back.regions.size() == 2);
  CHECK(back.regions[1].path == "/b c");
  CHECK(back.regions[1].is_default);
  CHECK(Contains(yaml, "mode: \"0640\""));

  Config plain = Finalized("");
  Config plain_back = Parse(ConfigToYaml(plain));
  CHECK(!plain_back.nbd_tcp);
  REQUIRE(plain_back.regions.size() == 1);
  CHECK(plain_back.regions[0].name == "local");
  CHECK(plain_back.consistency.vms.empty());
  CHECK(plain_back.tracking_dir == plain.tracking_dir);
}

TEST_CASE("LoadConfigFile") {
  TempDir tmp;
  fs::path f = tmp.path / "etc" / "r.yaml";
  fs::create_directories(f.parent_path());
  std::ofstream(f) << "state_dir: ../state\nio:\n  queue_depth: 0\n";
  Result<Config> bad = LoadConfigFile(f.string());
  REQUIRE(!bad.ok());
  CHECK(bad.status().message().rfind(f.string() + ":3:16: io.queue_depth: ", 0) == 0);

  std::ofstream(f) << "state_dir: ../state\n";
  Result<Config> ok = LoadConfigFile(f.string());
  REQUIRE_MESSAGE(ok.ok(), ok.status().ToString());
  CHECK(ok->state_dir == (tmp.path / "state").string());  // relative to the file's directory

  Result<Config> missing = LoadConfigFile((tmp.path / "nope.yaml").string());
  REQUIRE(!missing.ok());
  CHECK(missing.status().code() == Code::kNotFound);
  CHECK(Contains(missing.status().message(), "nope.yaml"));
}

TEST_CASE("the example config/rpointd.yaml parses and documents every key") {
  fs::path example = SourceFile("config/rpointd.yaml");
  INFO(example.string());
  Result<Config> r = LoadConfigFile(example.string());
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  Config c = r.value();
  REQUIRE(FinalizeConfig(c).ok());
  CHECK(c.state_dir == "/var/lib/rpointd");
  CHECK(c.control_socket == "/run/rpointd/control.sock");
  CHECK(c.nbd_socket == "/run/rpointd/nbd.sock");
  CHECK(c.disks_dir == "/var/lib/rpointd/disks");
  CHECK(c.metadata_db == "/var/lib/rpointd/metadata.db");
  CHECK(!c.nbd_tcp);
  // Every key appears in the file (set or, for region fields, in the commented example).
  std::ifstream in(example);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const std::string& key : ConfigKeys()) {
    std::string leaf = key.substr(key.find_last_of(".]") == std::string::npos ? 0 : key.find_last_of(".]") + 1);
    if (leaf == "{vm}") continue;  // a VM's name: the example shows one
    INFO(key);
    CHECK(Contains(text, leaf + ":"));
  }
}

TEST_CASE("tls: nbd.tls defaults to require once tls is configured; Unix stays off") {
  Config plain = Finalized("state_dir: /s\n");
  CHECK(plain.nbd_tls == "off");
  CHECK(plain.nbd_unix_tls == "off");
  CHECK_FALSE(plain.tls.configured());
  Config x = Finalized("state_dir: /s\ntls: {dir: pki}\n");
  CHECK(x.tls.dir == "/s/pki");  // relative to state_dir
  CHECK(x.tls.verify_peer);
  CHECK(x.nbd_tls == "require");
  CHECK(x.nbd_unix_tls == "off");
  Config p =
      Finalized("state_dir: /s\ntls: {psk_file: /k.psk}\nnbd: {tls: allow, unix_tls: require}\n");
  CHECK(p.tls.psk_file == "/k.psk");
  CHECK(p.nbd_tls == "allow");
  CHECK(p.nbd_unix_tls == "require");
  // The printed config parses back to the same thing.
  Config again = Finalized(ConfigToYaml(p));
  CHECK(again.nbd_tls == "allow");
  CHECK(again.tls.psk_file == "/k.psk");
}

TEST_CASE("tls: bad modes and TLS without keys are errors naming the key") {
  ExpectError("nbd:\n  tls: maybe\n", "2:8:", "nbd.tls", "off, allow or require");
  ExpectError("tls: {verify_peer: perhaps}\n", "1:20:", "tls.verify_peer");
  ExpectError("tls: {colour: red}\n", "1:7:", "tls.colour", "unknown key");
  Config c = Parse("nbd:\n  unix_tls: require\n");
  Status st = FinalizeConfig(c);
  CHECK_FALSE(st.ok());
  CHECK(
      Contains(st.message(), "t.yaml:2:13: nbd.unix_tls: 'require' needs tls.dir or tls.psk_file"));
}

TEST_CASE("regions on other hosts: regions[].peer, peer_region, peers.listen") {
  Config c = Finalized(
      "state_dir: /s\ntls: {dir: /pki}\npeers: {listen: \"10.0.0.1:10443\"}\nregions:\n"
      "  - {name: east, path: /r/east, default: true}\n"
      "  - {name: far, peer: \"10.0.0.2:10443\", peer_region: west}\n"
      "  - {name: far2, peer: \"[fd00::2]:10443\"}\n");
  REQUIRE(c.regions.size() == 3);
  CHECK_FALSE(c.regions[0].remote());
  CHECK(c.regions[1].remote());
  CHECK(c.regions[1].peer == "10.0.0.2:10443");
  CHECK(c.regions[1].peer_region == "west");
  CHECK(c.regions[1].path.empty());
  CHECK(c.regions[2].peer == "[fd00::2]:10443");
  CHECK(c.regions[2].peer_region == "local");  // the default
  REQUIRE(c.peers_listen);
  CHECK(FormatTcpAddress(*c.peers_listen) == "10.0.0.1:10443");
  // --check-config's YAML parses back to the same regions.
  Config again = Finalized(ConfigToYaml(c));
  REQUIRE(again.regions.size() == 3);
  CHECK(again.regions[1].peer == "10.0.0.2:10443");
  CHECK(again.regions[1].peer_region == "west");
  CHECK(again.peers_listen);
  CHECK(c.peers_deadline_seconds == 120);  // the default
  Config d = Finalized(
      "state_dir: /s\ntls: {dir: /pki}\n"
      "peers: {listen: \"10.0.0.1:10443\", deadline_seconds: 7}\n");
  CHECK(d.peers_deadline_seconds == 7);
  CHECK(Finalized(ConfigToYaml(d)).peers_deadline_seconds == 7);
  ExpectError("peers: {deadline_seconds: 0}\n", "1:", "peers.deadline_seconds");

  ExpectError("tls: {dir: /p}\nregions:\n  - {name: a, path: /a, peer: \"h:1\"}\n",
              "3:5:", "regions[0].peer", "path or a peer");
  ExpectError("tls: {dir: /p}\nregions:\n  - {name: a, peer: \"h:1\", default: true}\n",
              "3:5:", "regions[0].default", "cannot be the default");
  ExpectError("tls: {dir: /p}\nregions:\n  - {name: a, peer: \"h:1\", peer_region: 'x y'}\n",
              "3:", "regions[0].peer_region", "may only contain");
  Config no_tls =
      Parse("regions:\n  - {name: a, path: /a, default: true}\n  - {name: f, peer: \"h:1\"}\n");
  Status st = FinalizeConfig(no_tls);
  CHECK(Contains(st.message(), "regions[1].peer"));
  CHECK(Contains(st.message(), "tls.dir"));
  Config listen_no_tls = Parse("peers: {listen: \"0.0.0.0:10443\"}\n");
  st = FinalizeConfig(listen_no_tls);
  CHECK(Contains(st.message(), "peers.listen"));
  CHECK(Contains(st.message(), "tls.dir"));
}
