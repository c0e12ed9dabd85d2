// The rpoint CLI without a daemon: size parsing/printing, tables, argument
// handling and its exit codes (cli/size.h, cli/table.h, cli/app.h).
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <sstream>

#include "cli/app.h"
#include "cli/command.h"
#include "cli/nbd_client_args.h"
#include "cli/size.h"
#include "cli/table.h"

using namespace rpoint;
using namespace rpoint::cli;

TEST_CASE("ParseSize") {
  CHECK(ParseSize("0").value() == 0);
  CHECK(ParseSize("512").value() == 512);
  CHECK(ParseSize("512B").value() == 512);
  CHECK(ParseSize("1K").value() == 1024);
  CHECK(ParseSize("1k").value() == 1024);
  CHECK(ParseSize("512M").value() == 512ull << 20);
  CHECK(ParseSize("10G").value() == 10ull << 30);
  CHECK(ParseSize("10GiB").value() == 10ull << 30);
  CHECK(ParseSize("10gib").value() == 10ull << 30);
  CHECK(ParseSize("10Gi").value() == 10ull << 30);
  CHECK(ParseSize("2T").value() == 2ull << 40);
  CHECK(ParseSize("1P").value() == 1ull << 50);
  CHECK(ParseSize("18446744073709551615").value() == UINT64_MAX);
  for (const char* bad : {"", "G", "-1", "1.5G", "10GB", "10 G", "10X", " 10", "10G ",
                          "18446744073709551616", "16384P", "0x10", "+5"}) {
    CHECK_MESSAGE(!ParseSize(bad).ok(), bad);
  }
  CHECK(ParseSize("10GB").status().message().find("ambiguous") != std::string::npos);
}

TEST_CASE("FormatSize") {
  CHECK(FormatSize(0) == "0 B");
  CHECK(FormatSize(512) == "512 B");
  CHECK(FormatSize(1024) == "1 KiB");
  CHECK(FormatSize(10ull << 30) == "10 GiB");
  CHECK(FormatSize(1536ull << 20) == "1.5 GiB");
  CHECK(FormatSize((1ull << 30) + 512) == "1 GiB");  // rounds to two decimals
  CHECK(FormatSize(1ull << 50) == "1 PiB");
}

TEST_CASE("Table aligns columns") {
  Table t({"NAME", "SIZE"});
  t.add({"a-long-name", "1 GiB"});
  t.add({"b", "10 GiB"});
  std::ostringstream os;
  t.print(os);
  CHECK(os.str() == "NAME         SIZE\na-long-name  1 GiB\nb            10 GiB\n");
}

namespace {

int Run(std::vector<std::string> args, std::string* out = nullptr, std::string* err = nullptr) {
  std::ostringstream o, e;
  int rc = RunCli(args, o, e);
  if (out) *out = o.str();
  if (err) *err = e.str();
  return rc;
}

const std::string kNoDaemon = "--socket=/nonexistent/rpoint-test.sock";

}  // namespace

TEST_CASE("usage errors exit 2, help and version exit 0") {
  std::string out, err;
  CHECK(Run({"--help"}, &out) == 0);
  CHECK(out.find("disk create") != std::string::npos);
  CHECK(Run({"--version"}, &out) == 0);
  CHECK(out.rfind("rpoint ", 0) == 0);
  CHECK(Run({"disk", "--help"}, &out) == 0);
  CHECK(out.find("rpoint disk resize NAME --size SIZE") != std::string::npos);
  CHECK(Run({"disk", "create", "--help"}, &out) == 0);
  CHECK(out.find("--size") != std::string::npos);

  CHECK(Run({}, nullptr, &err) == 2);
  CHECK(Run({"frobnicate"}, nullptr, &err) == 2);
  CHECK(err.find("unknown command 'frobnicate'") != std::string::npos);
  CHECK(Run({"disk"}) == 2);
  CHECK(Run({"disk", "explode"}) == 2);
  CHECK(Run({"disk", "create"}, nullptr, &err) == 2);
  CHECK(err.find("missing NAME") != std::string::npos);
  CHECK(Run({kNoDaemon, "disk", "create", "a"}, nullptr, &err) == 2);  // neither size nor path
  CHECK(Run({kNoDaemon, "disk", "create", "a", "--size", "1G", "--path", "/x"}) == 2);
  CHECK(Run({kNoDaemon, "disk", "create", "a", "--size", "1GB"}, nullptr, &err) == 2);
  CHECK(err.find("ambiguous") != std::string::npos);
  CHECK(Run({kNoDaemon, "disk", "create", "a", "--size", "1G", "--colour", "red"}) == 2);
  CHECK(Run({kNoDaemon, "disk", "show", "a", "b"}) == 2);
  CHECK(Run({kNoDaemon, "disk", "resize", "a"}) == 2);  // --size required
  CHECK(Run({kNoDaemon, "-o", "yaml", "disk", "list"}) == 2);
  CHECK(Run({"-o"}) == 2);
}

TEST_CASE("an unreachable daemon exits 3, options anywhere") {
  std::string err;
  CHECK(Run({kNoDaemon, "disk", "list"}, nullptr, &err) == 3);
  CHECK(err.find("/nonexistent/rpoint-test.sock") != std::string::npos);
  CHECK(Run({"disk", "list", "-o", "json", kNoDaemon}) == 3);
  CHECK(Run({"disk", "create", "a", "--size", "1G", kNoDaemon}) == 3);
  CHECK(Run({"disk", "delete", "--force", "a", kNoDaemon}) == 3);
  CHECK(Run({kNoDaemon, "daemon", "status"}) == 3);
}

// The restore point verbs: argument shapes the CLI refuses itself (exit 2)
// and ones it accepts (they get as far as the missing daemon: exit 3).
TEST_CASE("restore point verbs: argument parsing") {
  std::string out, err;
  CHECK(Run({"--help"}, &out) == 0);
  for (const char* verb : {"vm create", "vm restore", "collection create", "restore-point create",
                           "restore-point verify", "operation show", "region list"}) {
    CHECK_MESSAGE(out.find(verb) != std::string::npos, verb);
  }
  CHECK(Run({"restore-point", "--help"}, &out) == 0);
  CHECK(out.find("rpoint restore-point create COLLECTION/NAME") != std::string::npos);

  // Accepted: they try to reach the daemon.
  for (std::vector<std::string> args : std::vector<std::vector<std::string>>{
           {"vm", "create", "web1", "--disk", "a", "--disk", "b"},
           {"vm", "create", "web1"},
           {"vm", "list"},
           {"vm", "show", "web1"},
           {"vm", "delete", "web1"},
           {"vm", "restore", "c/rp1", "web2"},
           {"vm", "restore", "c/rp1", "web2", "--disk-name", "a=new-a", "--disk-name", "b=x",
            "--wait"},
           {"collection", "create", "c", "--vm", "web1"},
           {"collection", "create", "c", "--vm", "web1", "--region", "nas"},
           {"collection", "list"},
           {"collection", "show", "c"},
           {"collection", "delete", "c"},
           {"restore-point", "create", "c/rp1"},
           {"restore-point", "create", "c/rp1", "--exclude-disk", "x", "--exclude-disk", "y",
            "--consistency", "fs", "--wait"},
           {"restore-point", "create", "c/rp1", "--consistency", "crash"},
           {"restore-point", "list", "c"},
           {"restore-point", "show", "c/rp1"},
           {"restore-point", "delete", "c/rp1"},
           {"restore-point", "verify", "c/rp1", "--wait"},
           {"disk", "create", "d", "--from", "c/rp1/a"},
           {"disk", "create", "d", "--from", "c/rp1/a", "--wait"},
           {"disk", "create", "d", "--size", "1G", "--granularity", "1M"},
           {"operation", "show", "0123-abcd"},
           {"operation", "show", "/operations/0123-abcd"},
           {"region", "list"},
       }) {
    args.insert(args.begin(), kNoDaemon);
    std::string line;
    for (const auto& a : args) line += a + " ";
    CHECK_MESSAGE(Run(args, nullptr, &err) == 3, line << "-> " << err);
  }

  // Refused before any request.
  for (std::vector<std::string> args : std::vector<std::vector<std::string>>{
           {"vm", "create"},
           {"vm", "restore", "c/rp1"},
           {"vm", "restore", "c", "web2"},        // not C/RP
           {"vm", "restore", "c/rp1/x", "web2"},  // too many parts
           {"vm", "restore", "c/rp1", "web2", "--disk-name", "a"},
           {"vm", "restore", "c/rp1", "web2", "--disk-name", "=b"},
           {"vm", "create", "web1", "--config", "/nonexistent/config.json"},
           {"collection", "create", "c"},  // --vm required
           {"restore-point", "create", "c"},
           {"restore-point", "create", "c/"},
           {"restore-point", "create", "/rp"},
           {"restore-point", "create", "c/rp1", "--consistency", "app"},
           {"restore-point", "show", "c"},
           {"restore-point", "verify", "c//rp1"},
           {"restore-point", "list"},
           {"disk", "create", "d", "--from", "c/rp1"},
           {"disk", "create", "d", "--from", "c/rp1/a", "--size", "1G"},
           {"disk", "create", "d", "--size", "1G", "--wait"},  // --wait is for --from
           {"disk", "create", "d", "--size", "1G", "--granularity", "big"},
           {"operation", "show"},
           {"region", "list", "extra"},
       }) {
    args.insert(args.begin(), kNoDaemon);
    std::string line;
    for (const auto& a : args) line += a + " ";
    CHECK_MESSAGE(Run(args, nullptr, &err) == 2, line << "-> " << err);
  }
  CHECK(Run({kNoDaemon, "restore-point", "create", "c/rp1", "--consistency", "app"}, nullptr,
            &err) == 2);
  CHECK(err.find("fs or crash") != std::string::npos);
}

TEST_CASE("C/RP/DISK names and operation ids") {
  std::vector<std::string> parts;
  CHECK(SplitNames("c/rp", 2, &parts));
  CHECK(parts == std::vector<std::string>{"c", "rp"});
  CHECK(SplitNames("c/rp/a", 3, &parts));
  CHECK(parts[2] == "a");
  CHECK(!SplitNames("c/rp", 3, &parts));
  CHECK(!SplitNames("c/rp/a", 2, &parts));
  CHECK(!SplitNames("c//a", 3, &parts));
  CHECK(!SplitNames("", 1, &parts));
  CHECK(RestorePointPath("c", "r p") == "/restorePointCollections/c/restorePoints/r%20p");

  HttpReply r;
  CHECK(OperationIdOf(r).empty());
  r.headers = {{"location", "/operations/abc-1"}};
  CHECK(OperationIdOf(r) == "abc-1");
  r.headers.insert(r.headers.begin(), {"Azure-AsyncOperation", "/operations/def-2?api-version=x"});
  CHECK(OperationIdOf(r) == "def-2");
}

TEST_CASE("default socket: /var/lib/rpointd if it is there, else /run/rpointd") {
  std::string s = DefaultSocket();
  struct stat st;
  bool var_lib = ::stat(kDefaultSocket, &st) == 0 && S_ISSOCK(st.st_mode);
  CHECK(s == (var_lib ? kDefaultSocket : kSystemdSocket));
}

TEST_CASE("NbdClientArgs: an access grant's URI as nbd-client arguments") {
  const std::string t(64, 'a');
  CHECK(NbdClientArgs("nbd://10.0.0.1:10809/" + t).value() == "-N " + t + " 10.0.0.1 10809");
  CHECK(NbdClientArgs("nbds://host.example:4000/" + t).value() ==
        "-N " + t + " host.example 4000 -enable-tls");
  CHECK(NbdClientArgs("nbd://[::1]:10809/" + t).value() == "-N " + t + " ::1 10809");
  CHECK(NbdClientArgs("nbd://[::1]/" + t).value() == "-N " + t + " ::1 10809");
  CHECK(NbdClientArgs("nbd://h/" + t).value() == "-N " + t + " h 10809");
  CHECK(NbdClientArgs("nbd+unix:///" + t + "?socket=/var/lib/rpointd/nbd.sock").value() ==
        "-N " + t + " -unix /var/lib/rpointd/nbd.sock");
  CHECK(NbdClientArgs("nbds+unix:///" + t + "?socket=/run/r%3Ad/nbd.sock").value() ==
        "-N " + t + " -unix /run/r:d/nbd.sock -enable-tls");
  for (const char* bad :
       {"http://h/x", "nbd://h:port/x", "nbd://h:1", "nbd://h:1/", "nbd://:1/x", "nbd://[::1/x",
        "nbd://[::1]x/x", "nbds://alice@h:1/x", "nbd://h:1/x?tls-certificates=d", "nbd+unix:///x",
        "nbd+unix:///x?socket=", "nbd+unix:///x?socket=/a%2", "nbd+unix:///?socket=/s",
        "nbd+unix:///x?socket=/a%20b", "nbd+unix:///x?socket=-s",
        "nbd+unix:///x?socket=/s&tls=1"}) {
    auto r = NbdClientArgs(bad);
    CHECK_MESSAGE(!r.ok(), bad);
    if (!r.ok()) CHECK(r.status().message().find("nbd-client") != std::string::npos);
  }
}
