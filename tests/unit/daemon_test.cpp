// Tests of daemon/: flags, listening sockets (stale, live, not a socket, modes,
// TCP), the state directory lock.
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "daemon/flags.h"
#include "daemon/listeners.h"
#include "daemon/state_dir.h"

using namespace rpoint;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "daemon_test.XXXXXX").string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() { fs::remove_all(path); }
};

Result<Flags> Parse(std::vector<const char*> args) {
  args.insert(args.begin(), "rpointd");
  return ParseFlags(static_cast<int>(args.size()), args.data());
}

int ConnectUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  int rc = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  close(fd);
  return rc;
}

// A socket file nobody listens on, as a killed daemon leaves behind.
void MakeStaleSocket(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  close(fd);
}

mode_t ModeOf(const std::string& path) {
  struct stat st {};
  REQUIRE(lstat(path.c_str(), &st) == 0);
  return st.st_mode;
}

}  // namespace

TEST_CASE("flags") {
  Result<Flags> f = Parse({"--config", "/etc/r.yaml", "--state-dir", "/s", "--log-level", "debug"});
  REQUIRE_MESSAGE(f.ok(), f.status().ToString());
  CHECK(*f->config_path == "/etc/r.yaml");
  CHECK(*f->state_dir == "/s");
  CHECK(*f->log_level == "debug");
  CHECK(!f->check_config);
  CHECK(!f->help);

  f = Parse({"-c", "x.yaml", "-s", "d", "-l", "warn", "--check-config"});
  REQUIRE(f.ok());
  CHECK(*f->config_path == "x.yaml");
  CHECK(*f->state_dir == "d");
  CHECK(f->check_config);
  CHECK(Parse({"--version"})->version);
  CHECK(Parse({"-h"})->help);
  CHECK(Parse({"--state-dir=/eq"})->state_dir == std::optional<std::string>("/eq"));

  Result<Flags> none = Parse({});
  REQUIRE(none.ok());
  CHECK(!none->config_path);
  CHECK(!none->state_dir);

  for (std::vector<const char*> bad : std::vector<std::vector<const char*>>{
           {"--bogus"}, {"word"}, {"--config"}, {"--state-dir", ""}, {"--config", ""},
           {"-s", "a", "-s", "b"}, {"--check-config=yes"}}) {
    Result<Flags> r = Parse(bad);
    INFO(bad[0]);
    CHECK(!r.ok());
    CHECK(r.status().code() == Code::kInvalidArgument);
  }
  CHECK(FlagsHelp().find("--check-config") != std::string::npos);
}

TEST_CASE("ListenUnix: creates with the mode, replaces stale sockets, refuses live ones") {
  TempDir tmp;
  std::string path = (tmp.path / "c.sock").string();
  {
    Result<Listener> l = ListenUnix(path, 0600);
    REQUIRE_MESSAGE(l.ok(), l.status().ToString());
    CHECK(S_ISSOCK(ModeOf(path)));
    CHECK((ModeOf(path) & 07777) == 0600);
    CHECK(l->address == "unix:" + path);
    CHECK(DescribeSocket(l->fd.get()) == "unix:" + path);
    CHECK(IsUnixSocket(l->fd.get()));
    CHECK(ConnectUnix(path) == 0);

    // A second listener on a live socket is refused, and the first keeps its file.
    Result<Listener> second = ListenUnix(path, 0600);
    REQUIRE(!second.ok());
    CHECK(second.status().code() == Code::kConflict);
    CHECK(second.status().message().find("listening on " + path) != std::string::npos);
    CHECK(ConnectUnix(path) == 0);
  }
  // Gone with its Listener.
  CHECK(!fs::exists(path));

  MakeStaleSocket(path);
  CHECK(ConnectUnix(path) != 0);
  Result<Listener> again = ListenUnix(path, 0666);
  REQUIRE_MESSAGE(again.ok(), again.status().ToString());
  CHECK((ModeOf(path) & 07777) == 0666);
  CHECK(ConnectUnix(path) == 0);
}

TEST_CASE("ListenUnix: never removes what is not a socket") {
  TempDir tmp;
  std::string path = (tmp.path / "file").string();
  std::ofstream(path) << "keep";
  Result<Listener> l = ListenUnix(path, 0600);
  REQUIRE(!l.ok());
  CHECK(l.status().code() == Code::kAlreadyExists);
  CHECK(fs::file_size(path) == 4);

  CHECK(!ListenUnix((tmp.path / std::string(120, 'x')).string(), 0600).ok());
  CHECK(!ListenUnix((tmp.path / "missing-dir" / "s.sock").string(), 0600).ok());
}

TEST_CASE("SocketFile leaves a replaced socket alone") {
  TempDir tmp;
  std::string path = (tmp.path / "s.sock").string();
  Result<Listener> first = ListenUnix(path, 0600);
  REQUIRE(first.ok());
  // Someone else's socket now sits at the path (e.g. a successor daemon).
  first->fd.reset();
  fs::remove(path);
  // The successor's file may well get the same inode number; its change time
  // tells them apart (file times tick at the kernel's coarse clock, ~4 ms).
  usleep(30 * 1000);
  Result<Listener> successor = ListenUnix(path, 0600);
  REQUIRE(successor.ok());
  first->file.remove();  // must not delete the successor's file
  CHECK(fs::exists(path));
  CHECK(ConnectUnix(path) == 0);
}

TEST_CASE("ListenTcp") {
  Result<std::vector<Listener>> l = ListenTcp(TcpAddress{"127.0.0.1", 0});
  // Port 0 is not a valid config value but lets the kernel choose here.
  REQUIRE_MESSAGE(l.ok(), l.status().ToString());
  REQUIRE(l->size() == 1);
  std::string addr = l->at(0).address;
  CHECK(addr.rfind("tcp:127.0.0.1:", 0) == 0);
  uint16_t port = static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1)));
  CHECK(!IsUnixSocket(l->at(0).fd.get()));

  // The same port again: in use, and the message says so.
  Result<std::vector<Listener>> busy = ListenTcp({"127.0.0.1", port});
  REQUIRE(!busy.ok());
  CHECK(busy.status().message().find("in use") != std::string::npos);

  CHECK(!ListenTcp({"no-such-host.invalid", 10809}).ok());
}

TEST_CASE("TakeActivatedSockets without LISTEN_FDS takes nothing") {
  unsetenv("LISTEN_FDS");
  Result<ActivatedSockets> a = TakeActivatedSockets();
  REQUIRE(a.ok());
  CHECK(!a->any);
  CHECK(!a->control);
  CHECK(a->nbd.empty());
}

TEST_CASE("StateLock: one holder at a time, pid recorded") {
  TempDir tmp;
  std::string dir = (tmp.path / "a" / "b").string();
  REQUIRE(MakeDirs(dir, 0700).ok());
  CHECK((ModeOf(dir) & 07777) == 0700);
  CHECK((ModeOf((tmp.path / "a").string()) & 07777) == 0700);
  CHECK(MakeDirs(dir, 0755).ok());  // exists: left as it is
  CHECK((ModeOf(dir) & 07777) == 0700);
  std::ofstream(tmp.path / "f") << "x";
  CHECK(!MakeDirs((tmp.path / "f").string(), 0700).ok());

  {
    Result<StateLock> lock = StateLock::Acquire(dir);
    REQUIRE_MESSAGE(lock.ok(), lock.status().ToString());
    std::ifstream in(lock->path());
    int pid = 0;
    in >> pid;
    CHECK(pid == getpid());
    // flock locks belong to the open file description: a second open conflicts
    // even within one process, as a second daemon would.
    Result<StateLock> second = StateLock::Acquire(dir);
    REQUIRE(!second.ok());
    CHECK(second.status().code() == Code::kConflict);
    CHECK(second.status().message().find("pid " + std::to_string(getpid())) != std::string::npos);
  }
  CHECK(StateLock::Acquire(dir).ok());  // released with its holder
}
