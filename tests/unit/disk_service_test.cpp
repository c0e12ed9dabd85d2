// DiskService (disks/disk_service.h): validation, files, metadata, restarts.
#include "disks/disk_service.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "disks/metadata_db.h"
#include "engine/file_disk.h"

using namespace rpoint;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/rpoint-disksvc-XXXXXX";
    REQUIRE(mkdtemp(t) != nullptr);
    path = t;
  }
  ~TempDir() { fs::remove_all(path); }
};

DiskServiceOptions Opts(const TempDir& t) {
  return {t.path + "/disks", t.path + "/metadata.db", false, t.path + "/tracking", {}, {"/"}};
}

std::unique_ptr<DiskService> OpenSvc(const TempDir& t) {
  auto s = DiskService::Open(Opts(t));
  REQUIRE_MESSAGE(s.ok(), s.status().ToString());
  return std::move(s).value();
}

void WriteFile(const std::string& path, uint64_t size) {
  std::ofstream f(path, std::ios::binary);
  f.seekp(static_cast<std::streamoff>(size) - 1);
  f.put('\0');
}

constexpr uint64_t kMiB = 1 << 20;

}  // namespace

TEST_CASE("ValidateName") {
  for (const char* ok : {"a", "vm1", "vm-1.disk_0", "A.B", "x..y", "0"}) {
    CHECK_MESSAGE(DiskService::ValidateName(ok).ok(), ok);
  }
  for (const char* bad : {"", ".", "..", ".hidden", "-opt", "a/b", "../etc", "a b", "a\\b",
                          "\xc3\xa9", "a:b", "a%2Fb"}) {
    CHECK_MESSAGE(!DiskService::ValidateName(bad).ok(), bad);
  }
  CHECK(DiskService::ValidateName(std::string(63, 'a')).ok());
  CHECK_FALSE(DiskService::ValidateName(std::string(64, 'a')).ok());
  CHECK_FALSE(DiskService::ValidateName(std::string("a\0b", 3)).ok());
}

TEST_CASE("ValidateSize and ValidateKind") {
  CHECK(DiskService::ValidateSize(512).ok());
  CHECK(DiskService::ValidateSize(DiskService::kMaxSizeBytes).ok());
  CHECK(DiskService::ValidateSize(0).code() == Code::kInvalidArgument);
  CHECK(DiskService::ValidateSize(1000).code() == Code::kInvalidArgument);
  CHECK(DiskService::ValidateSize(DiskService::kMaxSizeBytes + 512).code() == Code::kOutOfRange);
  CHECK(DiskService::ValidateKind("managed").ok());
  CHECK(DiskService::ValidateKind("shared").ok());
  CHECK(DiskService::ValidateKind("ephemeral").ok());
  CHECK_FALSE(DiskService::ValidateKind("Managed").ok());
  CHECK_FALSE(DiskService::ValidateKind("").ok());
}

TEST_CASE("create makes a sparse private file and a record") {
  TempDir t;
  auto svc = OpenSvc(t);
  auto d = svc->create("vm1", 64 * kMiB, "managed");
  REQUIRE_MESSAGE(d.ok(), d.status().ToString());
  CHECK(d->name == "vm1");
  CHECK(d->size_bytes == 64 * kMiB);
  CHECK_FALSE(d->adopted);
  CHECK(d->path == fs::canonical(t.path).string() + "/disks/vm1.raw");
  CHECK(d->time_created.size() == 27);
  CHECK(d->time_created.back() == 'Z');
  struct stat st {};
  REQUIRE(stat(d->path.c_str(), &st) == 0);
  CHECK(st.st_size == static_cast<off_t>(64 * kMiB));
  CHECK(st.st_blocks == 0);  // sparse
  CHECK((st.st_mode & 0777) == 0600);

  CHECK(svc->create("vm1", kMiB, "managed").status().code() == Code::kAlreadyExists);
  CHECK(svc->create("../x", kMiB, "managed").status().code() == Code::kInvalidArgument);
  CHECK(svc->create("x", 1000, "managed").status().code() == Code::kInvalidArgument);
  CHECK(svc->create("x", kMiB, "weird").status().code() == Code::kInvalidArgument);
  CHECK(svc->list().size() == 1);
  CHECK(svc->find_export("vm1") != nullptr);
  CHECK(svc->find_export("nope") == nullptr);
  CHECK(svc->list_exports().size() == 1);
}

TEST_CASE("create refuses a stray file and leaves no record") {
  TempDir t;
  auto svc = OpenSvc(t);
  WriteFile(t.path + "/disks/stray.raw.keep", 512);
  fs::rename(t.path + "/disks/stray.raw.keep", t.path + "/disks/stray.raw");
  auto d = svc->create("stray", kMiB, "managed");
  CHECK(d.status().code() == Code::kAlreadyExists);
  CHECK(svc->get("stray").status().code() == Code::kNotFound);
  CHECK(fs::file_size(t.path + "/disks/stray.raw") == 512);  // not ours: untouched
}

TEST_CASE("resize grows only") {
  TempDir t;
  auto svc = OpenSvc(t);
  REQUIRE(svc->create("d", kMiB, "managed").ok());
  auto g = svc->resize("d", 4 * kMiB);
  REQUIRE(g.ok());
  CHECK(g->size_bytes == 4 * kMiB);
  CHECK(fs::file_size(g->path) == 4 * kMiB);
  CHECK(svc->resize("d", 4 * kMiB).ok());  // same size: no-op
  CHECK(svc->resize("d", 2 * kMiB).status().code() == Code::kOutOfRange);
  CHECK(svc->resize("d", 4 * kMiB + 1).status().code() == Code::kInvalidArgument);
  CHECK(svc->resize("nope", 4 * kMiB).status().code() == Code::kNotFound);
  CHECK(svc->find_export("d")->size() == 4 * kMiB);
}

TEST_CASE("adopt: existing regular files only, once") {
  TempDir t;
  auto svc = OpenSvc(t);
  std::string img = t.path + "/img.raw";
  WriteFile(img, 2 * kMiB);
  CHECK(svc->adopt("a", "relative/path", "managed").status().code() == Code::kInvalidArgument);
  CHECK(svc->adopt("a", t.path + "/missing", "managed").status().code() == Code::kInvalidArgument);
  CHECK(svc->adopt("a", t.path, "managed").status().code() == Code::kInvalidArgument);  // a dir
  std::string odd = t.path + "/odd.raw";
  WriteFile(odd, 1000);
  CHECK(svc->adopt("a", odd, "managed").status().code() == Code::kInvalidArgument);

  auto d = svc->adopt("a", img, "shared");
  REQUIRE_MESSAGE(d.ok(), d.status().ToString());
  CHECK(d->adopted);
  CHECK(d->size_bytes == 2 * kMiB);
  CHECK(d->kind == "shared");
  CHECK_FALSE(d->block_device);

  // The same storage under another name, path, symlink or hard link: refused.
  CHECK(svc->adopt("b", img, "managed").status().code() == Code::kConflict);
  fs::create_symlink(img, t.path + "/link");
  CHECK(svc->adopt("b", t.path + "/link", "managed").status().code() == Code::kConflict);
  // A hard link is refused for having several links (its other name could be
  // one of rpointd's own files).
  fs::create_hard_link(img, t.path + "/hard");
  auto hard = svc->adopt("b", t.path + "/hard", "managed");
  CHECK(hard.status().code() == Code::kInvalidArgument);
  CHECK(hard.status().message().find("hard links") != std::string::npos);
  CHECK(svc->adopt("a", odd, "managed").status().code() == Code::kAlreadyExists);
  // A created disk's file cannot be adopted a second time either: the disks
  // directory is off limits, and a link to the file elsewhere is the same file.
  auto c = svc->create("c", kMiB, "managed");
  REQUIRE(c.ok());
  CHECK(svc->adopt("b", c->path, "managed").status().code() == Code::kInvalidArgument);
  fs::create_hard_link(c->path, t.path + "/c-link");
  CHECK(svc->adopt("b", t.path + "/c-link", "managed").status().code() == Code::kInvalidArgument);
  WriteFile(t.path + "/disks/foreign.img", kMiB);
  auto in_dir = svc->adopt("b", t.path + "/disks/foreign.img", "managed");
  CHECK(in_dir.status().code() == Code::kInvalidArgument);
  CHECK(in_dir.status().message().find("rpointd's own files") != std::string::npos);

  // Deleting an adopted disk leaves its file alone; a created one's is removed.
  CHECK(svc->remove("a", false).ok());
  CHECK(fs::exists(img));
  CHECK(svc->remove("c", false).ok());
  CHECK_FALSE(fs::exists(c->path));
  CHECK(svc->remove("c", false).code() == Code::kNotFound);
}

TEST_CASE("remove refuses while attached unless forced, which retires the device") {
  TempDir t;
  auto svc = OpenSvc(t);
  REQUIRE(svc->create("busy", kMiB, "managed").ok());
  auto dev = svc->find_export("busy");
  REQUIRE(dev != nullptr);
  {
    BlockDevice::Use use(dev);
    CHECK(svc->get("busy")->attached_clients == 1);
    Status s = svc->remove("busy", false);
    CHECK(s.code() == Code::kConflict);
    CHECK(s.message().find("1 attached") != std::string::npos);
    CHECK_FALSE(dev->retired());
    CHECK(svc->remove("busy", true).ok());
    CHECK(dev->retired());
    CHECK(svc->find_export("busy") == nullptr);
  }
  CHECK(svc->get("busy").status().code() == Code::kNotFound);
}

TEST_CASE("records survive a reopen; missing files become an error state") {
  TempDir t;
  std::string img = t.path + "/img.raw";
  WriteFile(img, kMiB);
  std::string created_path;
  {
    auto svc = OpenSvc(t);
    REQUIRE(svc->create("one", kMiB, "ephemeral").ok());
    auto two = svc->create("two", kMiB, "managed");
    REQUIRE(two.ok());
    created_path = two->path;
    REQUIRE(svc->adopt("three", img, "managed").ok());
    REQUIRE(svc->resize("one", 8 * kMiB).ok());
  }
  fs::remove(created_path);  // lost while the daemon was down
  auto svc = OpenSvc(t);
  auto all = svc->list();
  REQUIRE(all.size() == 3);
  CHECK(all[0].name == "one");
  CHECK(all[0].size_bytes == 8 * kMiB);
  CHECK(all[0].kind == "ephemeral");
  CHECK(all[0].error.empty());
  CHECK(all[1].name == "three");  // sorted by name
  CHECK(all[1].adopted);
  CHECK(all[1].path == fs::canonical(img).string());
  CHECK(all[2].name == "two");
  CHECK(all[2].error.find("No such file") != std::string::npos);
  CHECK(svc->find_export("two") == nullptr);
  CHECK(svc->resize("two", 2 * kMiB).status().code() == Code::kConflict);
  CHECK(svc->list_exports().size() == 2);
  CHECK(svc->remove("two", false).ok());  // an unavailable disk can still be deleted
  CHECK(svc->list().size() == 2);
}

TEST_CASE("start-up removes orphan files and adopts a grown file's size") {
  TempDir t;
  {
    auto svc = OpenSvc(t);
    REQUIRE(svc->create("keep", kMiB, "managed").ok());
  }
  // A create interrupted before its row committed (a sparse file, never
  // written), and foreign files that stay.
  { std::ofstream(t.path + "/disks/orphan.raw"); }
  fs::resize_file(t.path + "/disks/orphan.raw", kMiB);
  WriteFile(t.path + "/disks/notes.txt", 10);
  WriteFile(t.path + "/disks/.hidden.raw", 512);
  // A resize interrupted after the file grew.
  fs::resize_file(t.path + "/disks/keep.raw", 3 * kMiB);
  auto svc = OpenSvc(t);
  CHECK_FALSE(fs::exists(t.path + "/disks/orphan.raw"));
  CHECK(fs::exists(t.path + "/disks/notes.txt"));
  CHECK(fs::exists(t.path + "/disks/.hidden.raw"));
  CHECK(svc->get("keep")->size_bytes == 3 * kMiB);
}

TEST_CASE("a disk file whose row is lost is recovered, never deleted") {
  TempDir t;
  {
    auto svc = OpenSvc(t);
    REQUIRE(svc->create("lost", 2 * kMiB, "managed").ok());
    REQUIRE(svc->create("kept", kMiB, "managed").ok());
    std::ofstream f(t.path + "/disks/lost.raw", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(12345);
    f << "guest data";
  }
  // metadata.db put back from before "lost" existed: only "kept" has a row.
  {
    auto db = MetadataDb::Open(t.path + "/metadata.db");
    REQUIRE(db.ok());
    REQUIRE(db.value()->delete_disk("lost").ok());
  }
  // A stale tombstone of a committed delete.
  WriteFile(t.path + "/disks/gone.raw.deleting", kMiB);
  auto svc = OpenSvc(t);
  auto rec = svc->get("lost");
  REQUIRE(rec.ok());
  CHECK(rec->size_bytes == 2 * kMiB);
  CHECK(rec->error.empty());
  CHECK(fs::exists(t.path + "/disks/lost.raw"));
  CHECK_FALSE(fs::exists(t.path + "/disks/gone.raw.deleting"));
  std::ifstream f(t.path + "/disks/lost.raw", std::ios::binary);
  f.seekg(12345);
  std::string got(10, '\0');
  f.read(got.data(), 10);
  CHECK(got == "guest data");
}

TEST_CASE("a delete interrupted before its row's delete committed keeps the disk") {
  TempDir t;
  {
    auto svc = OpenSvc(t);
    REQUIRE(svc->create("d", kMiB, "managed").ok());
  }
  // The state a crash leaves between the tombstone rename and the row's delete.
  fs::rename(t.path + "/disks/d.raw", t.path + "/disks/d.raw.deleting");
  {
    auto svc = OpenSvc(t);
    auto rec = svc->get("d");
    REQUIRE(rec.ok());
    CHECK(rec->error.empty());
    CHECK(fs::exists(t.path + "/disks/d.raw"));
    CHECK_FALSE(fs::exists(t.path + "/disks/d.raw.deleting"));
    // A real delete leaves neither name behind, and the name can be used again.
    REQUIRE(svc->remove("d", false).ok());
    CHECK_FALSE(fs::exists(t.path + "/disks/d.raw"));
    CHECK_FALSE(fs::exists(t.path + "/disks/d.raw.deleting"));
    REQUIRE(svc->create("d", kMiB, "managed").ok());
  }
}

TEST_CASE("a database from a newer rpointd is refused") {
  TempDir t;
  { auto svc = OpenSvc(t); }
  {
    auto db = MetadataDb::Open(t.path + "/metadata.db");
    REQUIRE(db.ok());
    REQUIRE(db.value()->db().exec("UPDATE schema_version SET version = 999").ok());
  }
  auto svc = DiskService::Open(Opts(t));
  REQUIRE_FALSE(svc.ok());
  CHECK(svc.status().message().find("999") != std::string::npos);
}

TEST_CASE("tracking granularity: validated, persisted, tracked; delete drops the tracking dir") {
  for (uint64_t ok : {4096ull, 65536ull, 4194304ull}) {
    CHECK(DiskService::ValidateTrackingGranularity(ok).ok());
  }
  for (uint64_t bad : {0ull, 2048ull, 65535ull, 3ull << 12, 8388608ull}) {
    CHECK(DiskService::ValidateTrackingGranularity(bad).code() == Code::kInvalidArgument);
  }
  TempDir t;
  {
    auto svc = OpenSvc(t);
    CHECK(svc->create("bad", kMiB, "managed", 12345).status().code() == Code::kInvalidArgument);
    auto d = svc->create("d", kMiB, "managed", 16384);
    REQUIRE(d.ok());
    CHECK(d->tracking_granularity == 16384);
    auto fd = svc->file_disk("d");
    REQUIRE(fd);
    REQUIRE(fd->tracker());
    CHECK(fd->tracker()->granularity() == 16384);
    CHECK(fs::is_directory(t.path + "/tracking/d"));
    CHECK(svc->create("e", kMiB, "managed").value().tracking_granularity == 65536);
  }
  auto svc = OpenSvc(t);
  CHECK(svc->get("d")->tracking_granularity == 16384);
  CHECK(svc->file_disk("d")->tracker()->granularity() == 16384);
  REQUIRE(svc->remove("d", false).ok());
  CHECK_FALSE(fs::exists(t.path + "/tracking/d"));
  CHECK(svc->file_disk("d") == nullptr);
}

TEST_CASE("a disk being provisioned is not exported until marked, and survives as Creating") {
  TempDir t;
  {
    auto svc = OpenSvc(t);
    auto d = svc->create_provisioning("r", 2 * kMiB, 4096, "/restorePointCollections/c/x");
    REQUIRE(d.ok());
    CHECK(d->provisioning_state == "Creating");
    CHECK(svc->find_export("r") == nullptr);
    CHECK(svc->list_exports().empty());
    CHECK(svc->file_disk("r") != nullptr);
    CHECK(svc->create("r", kMiB, "managed").status().code() == Code::kAlreadyExists);
  }
  auto svc = OpenSvc(t);
  auto d = svc->get("r");
  REQUIRE(d.ok());
  CHECK(d->provisioning_state == "Creating");
  CHECK(d->source_resource_id == "/restorePointCollections/c/x");
  CHECK(svc->find_export("r") == nullptr);
  REQUIRE(svc->mark_provisioned("r").ok());
  CHECK(svc->find_export("r") != nullptr);
  CHECK(svc->list_exports().size() == 1);
  CHECK(svc->get("r")->provisioning_state == "Succeeded");
}

TEST_CASE("a damaged metadata.db is Corruption and the error says how to start without it") {
  // Garbage over a database's pages, a file that was never one, one cut short:
  // SQLite's CORRUPT / NOTADB come back as Code::kCorruption, and only that
  // code gets the hint (a plain I/O error does not).
  for (int damage = 0; damage < 3; ++damage) {
    INFO("damage " << damage);
    TempDir t;
    {
      auto svc = OpenSvc(t);
      for (int i = 0; i < 40; ++i) {
        REQUIRE(svc->create("d" + std::to_string(i), kMiB, "managed").ok());
      }
    }
    const std::string db = t.path + "/metadata.db";
    for (const char* f : {"-wal", "-shm"}) fs::remove(db + f);
    REQUIRE(fs::file_size(db) > 8192);
    if (damage == 0) {  // garbage over every page past the first (the schema)
      const auto size = fs::file_size(db);
      std::fstream f(db, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(4096);
      for (uint64_t i = 4096; i < size; ++i) f.put(static_cast<char>(i * 131 + 7));
    } else if (damage == 1) {  // not a database at all
      std::ofstream f(db, std::ios::binary | std::ios::trunc);
      f << std::string(8192, 'x');
    } else {  // cut short inside its pages
      fs::resize_file(db, 4096 + 100);
    }
    auto s = DiskService::Open(Opts(t));
    REQUIRE_FALSE(s.ok());
    CHECK_MESSAGE(s.status().code() == Code::kCorruption, s.status().ToString());
    CHECK(std::string(s.status().code_name()) == "Corruption");
    CHECK_MESSAGE(s.status().message().find("move " + db) != std::string::npos,
                  s.status().ToString());
  }
}
