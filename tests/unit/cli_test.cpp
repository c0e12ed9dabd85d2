// The rpoint CLI without a daemon: size parsing/printing, tables, argument
// handling and its exit codes (cli/size.h, cli/table.h, cli/app.h).
#include <doctest/doctest.h>

#include <sstream>

#include "cli/app.h"
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
