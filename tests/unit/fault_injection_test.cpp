// Unit tests for fault injection (common/fault_injection.h): the rule parser,
// hit counting (@N, *K, prefixes), the syscall wrappers on real files, the
// SQLite VFS shim turning an armed point into a real SQLite I/O error, and the
// helpers of common/file_io.h that take a fault point.
#include "common/fault_injection.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/fault_sqlite_vfs.h"
#include "common/file_io.h"
#include "common/unique_fd.h"

namespace rpoint::fault {
namespace {

namespace fs = std::filesystem;

struct TempDir {
  std::string path;
  TempDir() {
    std::string t = (fs::temp_directory_path() / "rpoint-fault-XXXXXX").string();
    REQUIRE(mkdtemp(t.data()) != nullptr);
    path = t;
  }
  ~TempDir() {
    DisarmAll();
    fs::remove_all(path);
  }
};

void ArmText(const std::string& text) {
  auto r = ParseRules(text);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  Arm(std::move(r).value());
}

TEST_CASE("rules parse: actions, @N, *K, prefixes, separators") {
  auto r =
      ParseRules(" pack.sync=EIO, staging.write=ENOSPC@3;pack.write=short*2\ntracking.*=28@2*1 ");
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  REQUIRE(r->size() == 4);
  CHECK(r.value()[0].pattern == "pack.sync");
  CHECK(r.value()[0].action.error == EIO);
  CHECK(r.value()[0].from_hit == 1);
  CHECK(r.value()[0].count == 0);
  CHECK(r.value()[1].action.error == ENOSPC);
  CHECK(r.value()[1].from_hit == 3);
  CHECK(r.value()[2].action.shorten);
  CHECK(r.value()[2].count == 2);
  CHECK(r.value()[3].pattern == "tracking.*");
  CHECK(r.value()[3].action.error == 28);
  CHECK(r.value()[3].from_hit == 2);
  CHECK(r.value()[3].count == 1);
  Arm(std::move(r).value());
  CHECK(Describe() ==
        "pack.sync=EIO,staging.write=ENOSPC@3,pack.write=short*2,tracking.*=ENOSPC@2*1");
  DisarmAll();
  CHECK(Describe() == "none");

  auto empty = ParseRules("  \n ");
  REQUIRE(empty.ok());
  CHECK(empty->empty());
}

TEST_CASE("bad rules are refused with the rule named") {
  for (const char* bad :
       {"pack.sync", "=EIO", "pack.sync=", "pack.sync=EWHAT", "nosuch.point=EIO", "nosuch.*=EIO",
        "pack.sync=EIO@0", "pack.sync=EIO*0", "pack.sync=EIO@x", "pack.sync=EIO*", "pack.sync=0",
        "pack.sync=99999", "pack.sync=delay", "pack.sync=delayx"}) {
    auto r = ParseRules(std::string("pack.write=EIO,") + bad);
    CHECK_MESSAGE(!r.ok(), bad);
    CHECK(r.status().code() == Code::kInvalidArgument);
    CHECK_MESSAGE(r.status().message().find(bad) != std::string::npos, r.status().message());
  }
}

TEST_CASE("hits: nothing armed passes; @N fails from the N-th hit; *K fails K hits") {
  DisarmAll();
  for (int i = 0; i < 3; ++i) CHECK(Hit("pack.sync").error == 0);
  CHECK(Hit(nullptr).error == 0);

  ArmText("pack.sync=EIO@3*2");
  std::vector<int> got;
  for (int i = 0; i < 6; ++i) got.push_back(Hit("pack.sync").error);
  CHECK(got == std::vector<int>{0, 0, EIO, EIO, 0, 0});
  CHECK(Hit("pack.write").error == 0);  // other points unaffected
  CHECK(Hit(nullptr).error == 0);

  // Re-arming resets the counts; the first matching rule decides.
  ArmText("pack.*=ENOSPC*1,pack.sync=EIO");
  CHECK(Hit("pack.sync").error == ENOSPC);
  CHECK(Hit("pack.sync").error == 0);  // pack.* matched but its one failure is spent
  CHECK(Hit("pack.rename").error == ENOSPC);
  DisarmAll();
  CHECK(Hit("pack.sync").error == 0);
}

TEST_CASE("wrappers fail real syscalls with the rule's errno, and short writes are short") {
  TempDir tmp;
  std::string path = tmp.path + "/f";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(fd);
  std::vector<char> buf(4096, 'x');

  ArmText("pack.write=ENOSPC*1,pack.sync=EIO*1,pack.rename=EIO*1,pack.dirsync=short*1");
  errno = 0;
  CHECK(Pwrite("pack.write", fd.get(), buf.data(), buf.size(), 0) == -1);
  CHECK(errno == ENOSPC);
  CHECK(Pwrite("pack.write", fd.get(), buf.data(), buf.size(), 0) == 4096);
  CHECK(Fdatasync("pack.sync", fd.get()) == -1);
  CHECK(errno == EIO);
  CHECK(Fdatasync("pack.sync", fd.get()) == 0);
  CHECK(Rename("pack.rename", path.c_str(), (path + "2").c_str()) == -1);
  CHECK(errno == EIO);
  CHECK(fs::exists(path));
  CHECK(Fsync("pack.dirsync", fd.get()) == -1);  // short on a non-write: EIO
  CHECK(errno == EIO);
  CHECK(Rename("pack.rename", path.c_str(), (path + "2").c_str()) == 0);

  ArmText("tracking.write=short");
  CHECK(Pwrite("tracking.write", fd.get(), buf.data(), 4096, 0) == 2048);
  CHECK(Write("tracking.write", fd.get(), buf.data(), 1) == 1);  // always progresses
  CHECK(WriteLength("tracking.write", 3) == 1);
  ArmText("tracking.write=delay50*1");
  auto t0 = std::chrono::steady_clock::now();
  CHECK(WriteLength("tracking.write", 3) == 3);  // waits, then proceeds whole
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(50));
  CHECK(Describe() == "tracking.write=delay50*1");
  // A long delay ends as soon as the rules change.
  ArmText("tracking.write=delay60000");
  std::thread held([] { CHECK(WriteLength("tracking.write", 8) == 8); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  t0 = std::chrono::steady_clock::now();
  DisarmAll();
  held.join();
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
  DisarmAll();
  CHECK(WriteLength("tracking.write", 3) == 3);
}

TEST_CASE("file_io: PreadDirect reads all or fails: short reads continued, EOF and EIO errors") {
  TempDir tmp;
  std::string path = tmp.path + "/f";
  const size_t size = 5 * 4096 + 100;  // an unaligned tail
  std::vector<char> data(size);
  for (size_t i = 0; i < size; ++i) data[i] = static_cast<char>(i * 7 + i / 4096);
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(fd);
  REQUIRE(rpoint::PwriteFull(fd.get(), data.data(), size, 0, "f").ok());
  // tmpfs may refuse O_DIRECT: then every read is buffered, which must work the same.
  UniqueFd direct(::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
  const size_t cap = 6 * 4096;
  std::unique_ptr<char, decltype(&std::free)> buf(static_cast<char*>(std::aligned_alloc(4096, cap)),
                                                  &std::free);
  for (int d = 0; d < 2; ++d) {
    const int dfd = d == 0 ? -1 : direct.get();
    // Whole file, the tail rounded up within cap; from an unaligned offset.
    REQUIRE(rpoint::PreadDirect(dfd, fd.get(), buf.get(), size, 0, "f", "snapshot.read", cap).ok());
    CHECK(std::memcmp(buf.get(), data.data(), size) == 0);
    REQUIRE(rpoint::PreadDirect(dfd, fd.get(), buf.get(), 5000, 123, "f", "snapshot.read").ok());
    CHECK(std::memcmp(buf.get(), data.data() + 123, 5000) == 0);
    // Short reads every time: still all of it.
    ArmText("snapshot.read=short");
    std::memset(buf.get(), 0, cap);
    REQUIRE(rpoint::PreadDirect(dfd, fd.get(), buf.get(), size, 0, "f", "snapshot.read", cap).ok());
    CHECK(std::memcmp(buf.get(), data.data(), size) == 0);
    CHECK(Hits("snapshot.read") > 2);
    // EIO is reported, naming the file.
    ArmText("snapshot.read=EIO@2*1");
    Status s = rpoint::PreadDirect(dfd, fd.get(), buf.get(), 4096, 0, "f", "snapshot.read");
    CHECK(s.ok());
    s = rpoint::PreadDirect(dfd, fd.get(), buf.get(), 4096, 0, "f", "snapshot.read");
    CHECK(s.code() == rpoint::Code::kIoError);
    CHECK_MESSAGE(s.message().find("read f") != std::string::npos, s.ToString());
    DisarmAll();
    // The end of the file before len is an error, never zeroes taken for data.
    s = rpoint::PreadDirect(dfd, fd.get(), buf.get(), 4096, 5 * 4096, "f", "snapshot.read", cap);
    CHECK(s.code() == rpoint::Code::kIoError);
    CHECK_MESSAGE(s.message().find("end of file") != std::string::npos, s.ToString());
  }
}

TEST_CASE("RPOINTD_FAULTS and RPOINTD_FAULTS_FILE arm rules; bad ones are errors") {
  TempDir tmp;
  ::setenv("RPOINTD_FAULTS", "catalog.sync=EIO@2", 1);
  REQUIRE(ArmFromEnvironment().ok());
  CHECK(Describe() == "catalog.sync=EIO@2");
  ::setenv("RPOINTD_FAULTS", "catalog.sync=EIO@", 1);
  CHECK(ArmFromEnvironment().code() == Code::kInvalidArgument);
  CHECK(Describe() == "catalog.sync=EIO@2");  // a bad rule keeps what was armed
  ::unsetenv("RPOINTD_FAULTS");

  std::string file = tmp.path + "/rules";
  ::setenv("RPOINTD_FAULTS_FILE", file.c_str(), 1);
  REQUIRE(ReloadFromFile().ok());  // missing file: no rules
  CHECK(Describe() == "none");
  FILE* f = std::fopen(file.c_str(), "w");
  REQUIRE(f);
  std::fputs("metadata.write=ENOSPC\n", f);
  std::fclose(f);
  REQUIRE(ReloadFromFile().ok());
  CHECK(Describe() == "metadata.write=ENOSPC");
  ::unsetenv("RPOINTD_FAULTS_FILE");
}

int Exec(sqlite3* db, const char* sql) {
  return sqlite3_exec(db, sql, nullptr, nullptr, nullptr);
}

int64_t Count(sqlite3* db) {
  sqlite3_stmt* st = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "SELECT count(*) FROM t", -1, &st, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(st) == SQLITE_ROW);
  int64_t n = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return n;
}

TEST_CASE("the SQLite shim: an armed sync or write fails the commit, which rolls back") {
  TempDir tmp;
  const char* vfs = SqliteVfs("catalog");
  REQUIRE(vfs != nullptr);
  CHECK(std::string(vfs) == "rpoint-catalog");
  CHECK(std::string(SqliteVfs("metadata")) == "rpoint-metadata");
  sqlite3* db = nullptr;
  std::string path = tmp.path + "/store.db";
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, vfs) ==
          SQLITE_OK);
  sqlite3_extended_result_codes(db, 1);
  REQUIRE(Exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;") == SQLITE_OK);
  REQUIRE(Exec(db, "CREATE TABLE t(x); INSERT INTO t VALUES(1);") == SQLITE_OK);

  struct Case {
    const char* rule;
    int rc;
  };
  for (Case c :
       {Case{"catalog.sync=EIO", SQLITE_IOERR_FSYNC}, Case{"catalog.sync=ENOSPC", SQLITE_FULL},
        Case{"catalog.write=EIO", SQLITE_IOERR_WRITE}, Case{"catalog.write=short", SQLITE_FULL},
        Case{"metadata.sync=EIO", SQLITE_OK}}) {
    CAPTURE(c.rule);
    ArmText(c.rule);
    REQUIRE(Exec(db, "BEGIN IMMEDIATE; INSERT INTO t VALUES(2);") == SQLITE_OK);
    int rc = Exec(db, "COMMIT");
    CHECK(rc == c.rc);
    if (rc != SQLITE_OK) (void)Exec(db, "ROLLBACK");
    DisarmAll();
    if (rc != SQLITE_OK) CHECK(Count(db) == 1);  // the failed commit left nothing
    (void)Exec(db, "DELETE FROM t WHERE x = 2");
  }
  // Disarmed, the same connection commits again; the data is intact after reopening.
  REQUIRE(Exec(db, "INSERT INTO t VALUES(3)") == SQLITE_OK);
  sqlite3_close(db);
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE, vfs) == SQLITE_OK);
  CHECK(Count(db) == 2);
  CHECK(Exec(db, "PRAGMA integrity_check") == SQLITE_OK);
  sqlite3_close(db);
}

// The one mkdir -p and directory fsync every component uses (common/file_io.h):
// created directories get exactly the caller's mode whatever the umask, an
// existing one is left alone, and the fsync's fault point fails it.
TEST_CASE("file_io: MakeDirs modes and created flag; FsyncDir honours its fault point") {
  TempDir tmp;
  mode_t old_umask = ::umask(077);
  bool created = false;
  std::string deep = tmp.path + "/a/b/c";
  Status s = MakeDirs(deep, 0750, &created);
  ::umask(old_umask);
  REQUIRE_MESSAGE(s.ok(), s.ToString());
  CHECK(created);
  for (const std::string& d : {tmp.path + "/a", tmp.path + "/a/b", deep}) {
    struct stat st {};
    REQUIRE(::stat(d.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0750);
  }
  REQUIRE(::chmod(deep.c_str(), 0700) == 0);
  REQUIRE(MakeDirs(deep, 0755, &created).ok());
  CHECK(!created);
  struct stat st {};
  REQUIRE(::stat(deep.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0700);  // existing: left as it is
  UniqueFd f(::open((tmp.path + "/file").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  REQUIRE(f);
  CHECK(MakeDirs(tmp.path + "/file", 0700).code() == Code::kAlreadyExists);
  CHECK(MakeDirs(tmp.path + "/file/x", 0700).code() == Code::kIoError);

  CHECK(FsyncDir(deep, "pack.dirsync").ok());
  ArmText("pack.dirsync=EIO*1");
  CHECK(FsyncDir(deep, "pack.dirsync").code() == Code::kIoError);
  CHECK(FsyncDir(deep, "pack.dirsync").ok());  // *1: only the first hit
  CHECK(FsyncDir(tmp.path + "/missing").code() == Code::kNotFound);
}

TEST_CASE("file_io: OpenFile names the file in its errors and honours its fault point") {
  TempDir tmp;
  const std::string path = tmp.path + "/p.pack";
  auto created = OpenFile(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600, "pack.open");
  REQUIRE_MESSAGE(created.ok(), created.status().ToString());
  CHECK(created->valid());
  auto again = OpenFile(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  CHECK(again.status().code() == Code::kAlreadyExists);
  CHECK(again.status().message().rfind("create " + path + ": ", 0) == 0);
  auto missing = OpenFile(tmp.path + "/none", O_RDONLY | O_CLOEXEC, 0, nullptr, "pack 7");
  CHECK(missing.status().code() == Code::kNotFound);
  CHECK(missing.status().message().rfind("open pack 7: ", 0) == 0);

  ArmText("pack.open=EIO*1");
  auto failed = OpenFile(path, O_RDONLY | O_CLOEXEC, 0, "pack.open");
  CHECK(failed.status().code() == Code::kIoError);
  CHECK(Hits("pack.open") == 1);
  CHECK(OpenFile(path, O_RDONLY | O_CLOEXEC, 0, nullptr).ok());      // unnamed: never fails
  CHECK(OpenFile(path, O_RDONLY | O_CLOEXEC, 0, "pack.open").ok());  // *1: only the first hit
}

TEST_CASE("file_io: ReadWholeFile reads to the end, by path or from a descriptor") {
  TempDir tmp;
  const std::string path = tmp.path + "/f";
  std::string big(40000, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  {
    UniqueFd f(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
    REQUIRE(f);
    REQUIRE(PwriteFull(f.get(), big.data(), big.size(), 0, path).ok());
  }
  auto r = ReadWholeFile(path);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  CHECK(r.value() == big);  // more than one 16 KiB buffer
  UniqueFd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(f);
  REQUIRE(::lseek(f.get(), 100, SEEK_SET) == 100);
  auto from_fd = ReadWholeFile(f.get(), "the file");
  REQUIRE(from_fd.ok());
  CHECK(from_fd.value() == big);  // from offset 0, whatever the file offset
  ArmText("snapshot.read=EIO");
  auto failed = ReadWholeFile(f.get(), "the file", "snapshot.read");
  CHECK(failed.status().code() == Code::kIoError);
  CHECK(failed.status().message().rfind("read the file: ", 0) == 0);
  DisarmAll();
  CHECK(ReadWholeFile(tmp.path + "/none").status().code() == Code::kNotFound);
  UniqueFd empty(::open((tmp.path + "/empty").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
  REQUIRE(empty);
  auto none = ReadWholeFile(tmp.path + "/empty");
  REQUIRE(none.ok());
  CHECK(none.value().empty());
}

TEST_CASE("file_io: WriteFileAtomic replaces whole, and a failed step keeps the old file") {
  TempDir tmp;
  mode_t old_umask = ::umask(022);
  Status s = WriteFileAtomic(tmp.path, "rec", "first\n", 0640);
  ::umask(old_umask);
  REQUIRE_MESSAGE(s.ok(), s.ToString());
  struct stat st {};
  REQUIRE(::stat((tmp.path + "/rec").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0640);
  CHECK(ReadWholeFile(tmp.path + "/rec").value() == "first\n");
  CHECK(!fs::exists(tmp.path + "/rec.tmp"));

  // A directory the caller keeps open serves the directory fsync.
  UniqueFd dir(::open(tmp.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  REQUIRE(dir);
  REQUIRE(WriteFileAtomic(tmp.path, "rec", "second", 0600, dir.get()).ok());
  CHECK(ReadWholeFile(tmp.path + "/rec").value() == "second");

  // Each step fails on its fault point (the write, the fdatasync, the
  // rename): the old content stays and no .tmp is left behind. The
  // directory fsync comes after the rename: the new content is in place.
  for (int step = 1; step <= 4; ++step) {
    CAPTURE(step);
    ArmText("tracking.create=EIO@" + std::to_string(step) + "*1");
    Status f = WriteFileAtomic(tmp.path, "rec", "third", 0600, dir.get(), "tracking.create");
    CHECK(f.code() == Code::kIoError);
    CHECK(Hits("tracking.create") == uint64_t(step));
    CHECK(!fs::exists(tmp.path + "/rec.tmp"));
    CHECK(ReadWholeFile(tmp.path + "/rec").value() == (step < 4 ? "second" : "third"));
    DisarmAll();
    REQUIRE(WriteFileAtomic(tmp.path, "rec", "second", 0600, dir.get()).ok());
  }
  CHECK(WriteFileAtomic(tmp.path + "/missing", "rec", "x", 0600).code() == Code::kNotFound);
}

}  // namespace
}  // namespace rpoint::fault
