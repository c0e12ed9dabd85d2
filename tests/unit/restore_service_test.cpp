// RestoreService end to end below HTTP: real sparse files, writes through
// FileDisk on a Reactor (so change tracking sees them), a real region store,
// real hook processes. Restore points are read back through their NBD export
// devices (PointDevice on the same reactor) and compared with copies of the
// disks taken at the cut.
#include "restore/restore_service.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <random>
#include <thread>

#include "common/fault_injection.h"
#include "common/json_raw.h"
#include "disks/disk_service.h"
#include "engine/change_tracker.h"
#include "engine/file_disk.h"
#include "engine/reactor.h"
#include "restore/hooks.h"
#include "store/point_writer.h"
#include "store/store.h"

namespace fs = std::filesystem;
using namespace rpoint;

namespace {

constexpr uint32_t kGran = 64 * 1024;
constexpr uint64_t kMiB = 1 << 20;

struct TempDir {
  std::string path;
  bool own = true;
  TempDir() {
    char tmpl[] = "/tmp/rpoint-restore-XXXXXX";
    path = mkdtemp(tmpl);
  }
  explicit TempDir(std::string existing) : path(std::move(existing)), own(false) {}
  ~TempDir() {
    if (own) fs::remove_all(path);
  }
};

struct SyncIo final : IoRequest {
  std::promise<int> done;
  void on_done(int r) override { done.set_value(r); }
};

using Bytes = std::vector<char>;

struct Env {
  TempDir tmp;
  std::unique_ptr<Reactor> reactor;
  std::thread loop;
  std::unique_ptr<DiskService> disks;
  std::unique_ptr<RestoreService> rs;
  std::map<std::string, FreezeHooks> hooks;

  Env() { start(); }
  // Works in `dir` (left in place): a second life of a daemon's state.
  explicit Env(std::string dir, std::map<std::string, FreezeHooks> h = {})
      : tmp(std::move(dir)), hooks(std::move(h)) {
    start();
  }
  void start() {
    reactor = std::move(Reactor::Create("restore-test", 64)).value();
    loop = std::thread([this] { reactor->run(); });
    open();
  }
  ~Env() {
    close();
    reactor->stop();
    loop.join();
  }
  std::string region_dir() const { return tmp.path + "/regions/local"; }
  void open() {
    auto d = DiskService::Open(
        {tmp.path + "/disks", tmp.path + "/meta.db", false, tmp.path + "/tracking", {}, {"/"}});
    REQUIRE(d.ok());
    disks = std::move(d).value();
    open_restore();
  }
  void open_restore() {
    RestoreServiceOptions o;
    o.regions = {{"local", region_dir(), true}};
    o.metadata_db = tmp.path + "/meta.db";
    o.tracking_dir = tmp.path + "/tracking";
    o.staging_dir = tmp.path + "/staging";
    o.vm_hooks = hooks;
    o.hook_timeout_seconds = 10;
    o.copy_threads = 2;
    auto r = RestoreService::Open(o, *disks);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    rs = std::move(r).value();
  }
  void close() {
    if (rs) rs->shutdown();
    rs.reset();
    disks.reset();
  }

  int io(BlockDevice& dev, IoKind kind, uint64_t off, char* buf, uint64_t len) {
    SyncIo r;
    r.kind = kind;
    r.offset = off;
    r.length = len;
    r.buf = buf;
    auto f = r.done.get_future();
    reactor->post([&] { dev.submit(*reactor, r); });
    return f.get();
  }
  // Fills [off, off+len) of a disk with `c` through its FileDisk.
  void write(const std::string& disk, uint64_t off, uint64_t len, char c) {
    auto d = disks->file_disk(disk);
    REQUIRE(d);
    Bytes buf(len, c);
    REQUIRE(io(*d, IoKind::kWrite, off, buf.data(), len) == 0);
  }
  Bytes file(const std::string& disk) {
    auto rec = disks->get(disk);
    REQUIRE(rec.ok());
    std::ifstream f(rec->path, std::ios::binary);
    Bytes b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return b;
  }
  Bytes point(const std::string& c, const std::string& rp, const std::string& disk) {
    auto dev = rs->exports().find_export(c + "/" + rp + "/" + disk);
    REQUIRE_MESSAGE(dev, "no export " << c << "/" << rp << "/" << disk);
    Bytes b(dev->size());
    REQUIRE(io(*dev, IoKind::kRead, 0, b.data(), b.size()) == 0);
    return b;
  }
  OperationRecord wait(const std::string& op) {
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    for (;;) {
      auto r = rs->get_operation(op);
      REQUIRE(r.ok());
      if (r->status != "InProgress") return r.value();
      REQUIRE(std::chrono::steady_clock::now() < until);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  RestorePointRecord create_point(const std::string& c, const std::string& rp,
                                  std::vector<std::string> exclude = {},
                                  const std::string& mode = "") {
    auto s = rs->create_restore_point(c, rp, exclude, mode);
    REQUIRE_MESSAGE(s.ok(), s.status().ToString());
    CHECK(s->created);
    CHECK(s->record.provisioning_state == "Creating");
    auto op = wait(s->operation_id);
    CHECK_MESSAGE(op.status == "Succeeded", op.error_code << ": " << op.error_message);
    auto p = rs->get_restore_point(c, rp);
    REQUIRE(p.ok());
    return p.value();
  }
  void make_disk(const std::string& name, uint64_t size, const std::string& kind = "managed") {
    auto r = disks->create(name, size, kind, kGran);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  }
};

const DiskRestorePointRecord& Dp(const RestorePointRecord& p, const std::string& disk) {
  for (const auto& d : p.disk_restore_points) {
    if (d.disk == disk) return d;
  }
  FAIL("no disk point " << disk);
  return p.disk_restore_points.front();
}

}  // namespace

TEST_CASE("restore points: full then incremental, exact, only changed blocks stored") {
  Env e;
  e.make_disk("a", 4 * kMiB);
  e.make_disk("b", 2 * kMiB);
  e.write("a", 0, 5 * kGran, 'x');           // blocks 0-4
  e.write("a", 40 * kGran, 2 * kGran, 'y');  // blocks 40-41
  e.write("b", kGran + 100, 10, 'z');        // block 1, unaligned
  REQUIRE(e.rs->put_vm("vm", {"a", "b"}, {{"cpus", 2}}).ok());
  auto coll = e.rs->put_collection("c", "vm", "");
  REQUIRE(coll.ok());
  CHECK(coll->second);
  CHECK(coll->first.region == "local");

  auto rp1 = e.create_point("c", "rp1");
  CHECK(rp1.provisioning_state == "Succeeded");
  CHECK(rp1.cut_pause_ns >= 0);
  CHECK(Dp(rp1, "a").full);
  CHECK(Dp(rp1, "a").blocks_to_copy == 7);
  CHECK(Dp(rp1, "b").blocks_to_copy == 1);
  CHECK(Dp(rp1, "a").completion_percent == 100);
  // Kept as its stored text (common/json_raw.h).
  CHECK(nlohmann::json::parse(RawJsonText(rp1.source_metadata["configuration"]))["cpus"] == 2);
  CHECK(rp1.source_metadata["storageProfile"]["disks"].size() == 2);
  Bytes a1 = e.file("a"), b1 = e.file("b");

  e.write("a", 2 * kGran, 4096, 'q');    // block 2
  e.write("a", 63 * kGran, kGran, 'r');  // last block
  auto rp2 = e.create_point("c", "rp2");
  CHECK_FALSE(Dp(rp2, "a").full);
  CHECK(Dp(rp2, "a").parent_store_point == Dp(rp1, "a").store_point);
  CHECK(Dp(rp2, "a").blocks_to_copy == 2);
  CHECK(Dp(rp2, "b").blocks_to_copy == 0);
  CHECK(Dp(rp2, "b").bytes_stored == 0);
  Bytes a2 = e.file("a"), b2 = e.file("b");
  CHECK(a1 != a2);

  CHECK(e.point("c", "rp1", "a") == a1);
  CHECK(e.point("c", "rp1", "b") == b1);
  CHECK(e.point("c", "rp2", "a") == a2);
  CHECK(e.point("c", "rp2", "b") == b2);
  auto exports = e.rs->exports().list_exports();
  CHECK(exports.size() == 4);
  CHECK(e.rs->exports().find_export("c/rp9/a") == nullptr);

  // An identical repeat is not a new point; a different one conflicts.
  auto again = e.rs->create_restore_point("c", "rp2", {}, "CrashConsistent");
  REQUIRE(again.ok());
  CHECK_FALSE(again->created);
  CHECK(e.rs->create_restore_point("c", "rp2", {"b"}, "").status().code() == Code::kConflict);
  auto list = e.rs->list_restore_points("c");
  REQUIRE(list.ok());
  REQUIRE(list->size() == 2);
  CHECK(list->at(0).name == "rp1");
}

TEST_CASE("restore points: a write after the cut stays out of the point (copy-before-write)") {
  Env e;
  std::string mark = e.tmp.path + "/thawing", go = e.tmp.path + "/go";
  e.hooks["vm"] = {"echo \"$RPOINT_PHASE $RPOINT_VM $RPOINT_COLLECTION $RPOINT_RESTORE_POINT\" > " +
                       e.tmp.path + "/env",
                   "touch " + mark + "; while [ ! -e " + go + " ]; do sleep 0.01; done"};
  e.close();
  e.open();
  e.make_disk("a", 2 * kMiB);
  e.write("a", 0, 8 * kGran, 'o');
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "local").ok());
  Bytes at_cut = e.file("a");

  auto s = e.rs->create_restore_point("c", "rp1", {}, "FileSystemConsistent");
  REQUIRE(s.ok());
  // The thaw hook runs after the cut and before the copy: write now.
  while (!fs::exists(mark)) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  e.write("a", 3 * kGran, kGran, 'N');
  e.write("a", 20 * kGran, 4096, 'N');  // was a hole at the cut
  auto busy = e.rs->create_restore_point("c", "rp2", {}, "");
  CHECK(busy.status().code() == Code::kConflict);
  auto during = e.rs->get_restore_point("c", "rp1");
  REQUIRE(during.ok());
  CHECK(during->provisioning_state == "Creating");
  { std::ofstream(go).close(); }
  auto op = e.wait(s->operation_id);
  REQUIRE(op.status == "Succeeded");
  CHECK(op.percent_complete == 100);
  CHECK(e.point("c", "rp1", "a") == at_cut);
  std::ifstream env(e.tmp.path + "/env");
  std::string line;
  std::getline(env, line);
  CHECK(line == "freeze vm c rp1");

  // The next point has exactly the two post-cut writes.
  auto rp2 = e.create_point("c", "rp2");
  CHECK(Dp(rp2, "a").blocks_to_copy == 2);
  CHECK(e.point("c", "rp2", "a") == e.file("a"));
}

TEST_CASE("restore points: a write in flight across the cut does not stall the control API") {
  Env e;
  e.make_disk("a", 2 * kMiB);
  e.write("a", 0, kGran, 'x');
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "local").ok());
  auto disk = e.disks->file_disk("a");
  REQUIRE(disk);
  ChangeTracker* t = disk->tracker();
  // A mutation that entered before the cut and has not completed (a write
  // stuck in a slow disk) holds its epoch ticket; the point must wait for it
  // before retiring that epoch's generation.
  uint64_t ticket = t->enter();
  auto s = e.rs->create_restore_point("c", "rp1", {}, "");
  REQUIRE(s.ok());
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (t->waiting_for_writes() == 0) {
    REQUIRE(std::chrono::steady_clock::now() < until);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  // The control API answers while the point waits.
  auto get = std::async(std::launch::async, [&] { return e.rs->get_restore_point("c", "rp1"); });
  auto list = std::async(std::launch::async, [&] { return e.rs->list_restore_points("c"); });
  bool got_answer = get.wait_for(std::chrono::seconds(3)) == std::future_status::ready;
  bool list_answer = list.wait_for(std::chrono::seconds(3)) == std::future_status::ready;
  CHECK_MESSAGE(got_answer, "GET of a point stalled behind its tracker retirement");
  CHECK_MESSAGE(list_answer, "list of points stalled behind a tracker retirement");
  t->leave(ticket);
  auto during = get.get();
  REQUIRE(during.ok());
  if (got_answer) CHECK(during->provisioning_state == "Creating");
  REQUIRE(list.get().ok());
  auto op = e.wait(s->operation_id);
  CHECK_MESSAGE(op.status == "Succeeded", op.error_code << ": " << op.error_message);
  // The generation was retired once the write left: the next point is
  // incremental and copies only the new change.
  e.write("a", 10 * kGran, 4096, 'y');
  auto rp2 = e.create_point("c", "rp2");
  CHECK_FALSE(Dp(rp2, "a").full);
  CHECK(Dp(rp2, "a").blocks_to_copy == 1);
}

TEST_CASE("restore points: validation, excluded and shared disks, freeze failure") {
  Env e;
  e.hooks["vm"] = {"echo frozen-fail >&2; exit 3", "touch " + e.tmp.path + "/thawed"};
  e.close();
  e.open();
  e.make_disk("a", kMiB);
  e.make_disk("s", kMiB, "shared");
  e.make_disk("t", kMiB, "ephemeral");
  e.make_disk("other", kMiB);
  REQUIRE(e.rs->put_vm("vm", {"a", "s", "t"}, nullptr).ok());
  CHECK(e.rs->put_vm("vm2", {"a"}, nullptr).status().code() == Code::kConflict);
  CHECK(e.rs->put_vm("vm2", {"nope"}, nullptr).status().code() == Code::kInvalidArgument);
  CHECK(e.rs->put_vm("vm2", {"other", "other"}, nullptr).status().code() == Code::kInvalidArgument);
  CHECK(e.rs->vm_of_disk("a") == std::optional<std::string>("vm"));
  CHECK(e.rs->put_collection("c", "vm", "mars").status().code() == Code::kInvalidArgument);
  CHECK(e.rs->put_collection("c", "novm", "").status().code() == Code::kNotFound);
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  CHECK_FALSE(e.rs->put_collection("c", "vm", "").value().second);  // identical repeat
  // A VM may have several collections (one per region for copies).
  CHECK(e.rs->put_collection("c2", "vm", "").value().second);

  auto r = e.rs->create_restore_point("c", "rp", {}, "");
  CHECK(r.status().code() == Code::kInvalidArgument);
  CHECK(r.status().message().find("'s'") != std::string::npos);
  r = e.rs->create_restore_point("c", "rp", {"s"}, "");
  CHECK(r.status().message().find("'t'") != std::string::npos);
  r = e.rs->create_restore_point("c", "rp", {"s", "t", "other"}, "");
  CHECK(r.status().code() == Code::kInvalidArgument);
  CHECK(e.rs->create_restore_point("nope", "rp", {}, "").status().code() == Code::kNotFound);

  // Freeze fails: the point fails with FreezeFailed, thaw still ran.
  r = e.rs->create_restore_point("c", "rp", {"s", "t"}, "FileSystemConsistent");
  REQUIRE(r.ok());
  auto op = e.wait(r->operation_id);
  CHECK(op.status == "Failed");
  CHECK(op.error_code == "FreezeFailed");
  CHECK(op.error_message.find("frozen-fail") != std::string::npos);
  CHECK(op.error_message.find("status 3") != std::string::npos);
  CHECK(fs::exists(e.tmp.path + "/thawed"));
  auto p = e.rs->get_restore_point("c", "rp");
  CHECK(p->provisioning_state == "Failed");
  CHECK(p->error_code == "FreezeFailed");

  auto ok = e.create_point("c", "rp-ok", {"s", "t"});
  CHECK(ok.disk_restore_points.size() == 1);
  CHECK(ok.exclude_disks == std::vector<std::string>{"s", "t"});

  // No freeze hook for this VM.
  REQUIRE(e.rs->put_vm("vm3", {"other"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c3", "vm3", "").ok());
  r = e.rs->create_restore_point("c3", "rp", {}, "FileSystemConsistent");
  CHECK(r.status().code() == Code::kInvalidArgument);
  // Deleting a VM keeps its collection and points.
  REQUIRE(e.rs->delete_vm("vm").ok());
  CHECK(e.rs->get_restore_point("c", "rp-ok").ok());
  CHECK(e.rs->create_restore_point("c", "rp2", {}, "").status().code() == Code::kNotFound);
}

TEST_CASE("restore points: a grown disk and a disk added to the VM") {
  Env e;
  e.make_disk("a", kMiB);
  e.make_disk("b", kMiB);
  e.write("a", 0, kMiB, 'a');
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  auto rp1 = e.create_point("c", "rp1");
  Bytes a1 = e.file("a");

  REQUIRE(e.disks->resize("a", 3 * kMiB).ok());
  e.write("a", 2 * kMiB + 5 * kGran, kGran, 'g');
  e.write("b", 0, 3 * kGran, 'b');
  REQUIRE(e.rs->put_vm("vm", {"a", "b"}, nullptr).ok());
  auto rp2 = e.create_point("c", "rp2");
  CHECK_FALSE(Dp(rp2, "a").full);
  CHECK(Dp(rp2, "a").size_bytes == 3 * kMiB);
  CHECK(Dp(rp2, "a").blocks_to_copy == 1);
  CHECK(Dp(rp2, "b").full);
  CHECK(Dp(rp2, "b").blocks_to_copy == 3);
  CHECK(e.point("c", "rp2", "a") == e.file("a"));
  CHECK(e.point("c", "rp2", "b") == e.file("b"));
  CHECK(e.point("c", "rp1", "a") == a1);
}

TEST_CASE("restore points: a failed point keeps its changes for the next one") {
  Env e;
  std::string mark = e.tmp.path + "/thawing", go = e.tmp.path + "/go";
  e.hooks["vm"] = {"true", "touch " + mark + "; while [ ! -e " + go + " ]; do sleep 0.01; done"};
  e.close();
  e.open();
  e.make_disk("a", 2 * kMiB);
  e.write("a", 0, 2 * kGran, '1');
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  auto rp1 = e.create_point("c", "rp1");
  e.write("a", 10 * kGran, kGran, '2');

  // Fail rp2 after its cut: shut the service down while the thaw hook holds the job.
  auto s = e.rs->create_restore_point("c", "rp2", {}, "FileSystemConsistent");
  REQUIRE(s.ok());
  while (!fs::exists(mark)) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  e.write("a", 12 * kGran, kGran, '3');  // after rp2's cut
  std::thread stopper([&] { e.rs->shutdown(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  { std::ofstream(go).close(); }
  stopper.join();
  e.rs.reset();
  e.open_restore();
  auto p2 = e.rs->get_restore_point("c", "rp2");
  REQUIRE(p2.ok());
  CHECK(p2->provisioning_state == "Failed");
  auto op2 = e.rs->get_operation(s->operation_id);
  CHECK(op2->status == "Failed");
  CHECK(e.rs->exports().find_export("c/rp2/a") == nullptr);

  fs::remove(mark);
  auto rp3 = e.create_point("c", "rp3", {}, "FileSystemConsistent");  // go exists: no wait
  CHECK_FALSE(Dp(rp3, "a").full);
  CHECK(Dp(rp3, "a").parent_store_point == Dp(rp1, "a").store_point);
  CHECK(Dp(rp3, "a").blocks_to_copy == 2);  // blocks 10 and 12
  CHECK(e.point("c", "rp3", "a") == e.file("a"));
}

TEST_CASE("restore points: a failed disk read in the copy fails the point; a short one is continued") {
  Env e;
  e.make_disk("a", 2 * kMiB);
  e.write("a", 0, 2 * kMiB, 'q');
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "local").ok());
  struct Disarm {
    ~Disarm() { fault::DisarmAll(); }
  } disarm;

  // EIO on the copier's disk reads: Failed, loudly, and no point holds
  // whatever the buffer had instead of the disk's data.
  auto rules = fault::ParseRules("snapshot.read=EIO");
  REQUIRE_MESSAGE(rules.ok(), rules.status().ToString());
  fault::Arm(std::move(rules).value());
  auto s = e.rs->create_restore_point("c", "bad", {}, "");
  REQUIRE(s.ok());
  auto op = e.wait(s->operation_id);
  CHECK(fault::Hits("snapshot.read") > 0);  // the copy-out's reads reached the point
  fault::DisarmAll();
  CHECK(op.status == "Failed");
  CHECK_MESSAGE(op.error_message.find("Input/output error") != std::string::npos,
                op.error_message);
  CHECK_MESSAGE(op.error_message.find("disk a") != std::string::npos, op.error_message);
  auto bad = e.rs->get_restore_point("c", "bad");
  REQUIRE(bad.ok());
  CHECK(bad->provisioning_state == "Failed");
  CHECK(e.rs->exports().find_export("c/bad/a") == nullptr);

  // Short reads (half of each read, every time): continued, the point is exact.
  e.write("a", 5 * kGran, kGran, 'r');
  rules = fault::ParseRules("snapshot.read=short");
  REQUIRE(rules.ok());
  fault::Arm(std::move(rules).value());
  auto good = e.create_point("c", "good");
  CHECK(fault::Hits("snapshot.read") > 0);
  fault::DisarmAll();
  CHECK(good.provisioning_state == "Succeeded");
  CHECK(e.point("c", "good", "a") == e.file("a"));
}

TEST_CASE("restore points: recovery after a crash during creation and restore") {
  Env e;
  e.make_disk("a", kMiB);
  e.write("a", 0, kGran, 'a');
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  auto rp1 = e.create_point("c", "rp1");
  REQUIRE(e.disks->create_provisioning("half", kMiB, kGran, "/x").ok());
  CHECK(e.disks->find_export("half") == nullptr);
  CHECK(e.disks->find_export("a") != nullptr);
  e.close();

  // What a crash mid-job leaves: the point Creating, its operation InProgress,
  // a staging file, a disk being restored.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((e.tmp.path + "/meta.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db,
                       "UPDATE restore_points SET provisioning_state = 'Creating'; "
                       "UPDATE operations SET status = 'InProgress', end_time = ''",
                       nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  std::string staging = e.tmp.path + "/staging/a.c.rp1.staging";
  { std::ofstream(staging).close(); }
  // A store point committed by a job that died before recording it (its tag
  // names the interrupted point: ours to delete), and one whose tag names
  // nothing this metadata knows (someone's data: kept until an operator's
  // gc --orphans).
  uint64_t orphan = 0, foreign = 0;
  {
    auto st = store::Store::Open({e.region_dir()});
    REQUIRE(st.ok());
    for (const char* tag :
         {"/restorePointCollections/c/restorePoints/rp1/diskRestorePoints/a", "foreign"}) {
      auto w = st.value()->begin_point({0, kMiB, kGran, tag});
      REQUIRE(w.ok());
      Bytes data(kGran, 'o');
      REQUIRE(w.value()->put(0, data.data(), data.size()).ok());
      auto info = w.value()->commit();
      REQUIRE(info.ok());
      (orphan ? foreign : orphan) = info->id;
    }
  }

  e.open();
  auto p = e.rs->get_restore_point("c", "rp1");
  REQUIRE(p.ok());
  CHECK(p->provisioning_state == "Failed");
  CHECK(p->error_message == "daemon restarted during creation");
  CHECK(e.rs->get_operation(p->operation_id)->status == "Failed");
  CHECK_FALSE(fs::exists(staging));
  CHECK(e.disks->get("half").status().code() == Code::kNotFound);
  e.close();  // the region is free again: look inside
  {
    auto st = store::Store::Open({e.region_dir()});
    REQUIRE(st.ok());
    CHECK(st.value()->point(orphan).status().code() == Code::kNotFound);
    // rp1's point went with its Failed record; only the foreign one is left.
    REQUIRE(st.value()->list_points()->size() == 1);
    CHECK(st.value()->point(foreign).ok());
  }
  e.open();
  auto gc = e.rs->gc_region("local", true);
  REQUIRE(gc.ok());
  CHECK(gc.value()["storePointsDeleted"] == 1);
  // The failed point's store point was released; the next point is full again.
  auto rp2 = e.create_point("c", "rp2");
  CHECK(Dp(rp2, "a").full);
  CHECK(e.point("c", "rp2", "a") == e.file("a"));
}

TEST_CASE("restore points: deleting points in the middle and the base; restore disk and VM") {
  Env e;
  e.make_disk("a", 2 * kMiB);
  e.make_disk("b", kMiB);
  REQUIRE(e.rs->put_vm("vm", {"a", "b"}, {{"os", "linux"}}).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  std::map<std::string, Bytes> saved;
  for (int i = 1; i <= 3; ++i) {
    e.write("a", static_cast<uint64_t>(i) * 3 * kGran, kGran + 7, static_cast<char>('0' + i));
    e.write("b", static_cast<uint64_t>(i) * kGran, 4096, static_cast<char>('0' + i));
    e.create_point("c", "rp" + std::to_string(i));
    saved["rp" + std::to_string(i)] = e.file("a");
  }
  CHECK(e.rs->delete_restore_point("c", "rp2").ok());
  CHECK(e.rs->get_restore_point("c", "rp2").status().code() == Code::kNotFound);
  CHECK(e.rs->delete_restore_point("c", "rp2").code() == Code::kNotFound);
  e.write("a", 0, kGran, 'z');
  auto rp4 = e.create_point("c", "rp4");
  CHECK_FALSE(Dp(rp4, "a").full);
  saved["rp4"] = e.file("a");
  for (const auto& rp : {"rp1", "rp3", "rp4"}) CHECK(e.point("c", rp, "a") == saved[rp]);

  // The base itself goes: its store point stays as the parent of the next.
  REQUIRE(e.rs->delete_restore_point("c", "rp4").ok());
  e.write("a", kGran, kGran, 'w');
  auto rp5 = e.create_point("c", "rp5");
  CHECK_FALSE(Dp(rp5, "a").full);
  CHECK(Dp(rp5, "a").parent_store_point == Dp(rp4, "a").store_point);
  CHECK(e.point("c", "rp5", "a") == e.file("a"));
  CHECK(e.point("c", "rp1", "a") == saved["rp1"]);

  // Restore one disk.
  auto bad = e.rs->start_restore_disk(
      "r", "/restorePointCollections/c/restorePoints/rp2/diskRestorePoints/a");
  CHECK(bad.status().code() == Code::kNotFound);
  auto op = e.rs->start_restore_disk(
      "r", "/restorePointCollections/c/restorePoints/rp3/diskRestorePoints/a");
  REQUIRE(op.ok());
  auto done = e.wait(op.value());
  REQUIRE(done.status == "Succeeded");
  auto r = e.disks->get("r");
  REQUIRE(r.ok());
  CHECK(r->provisioning_state == "Succeeded");
  CHECK(r->source_resource_id.find("/rp3/") != std::string::npos);
  CHECK(e.file("r") == saved["rp3"]);
  struct stat st {};
  REQUIRE(::stat(r->path.c_str(), &st) == 0);
  CHECK(static_cast<uint64_t>(st.st_blocks) * 512 < kMiB);  // holes stayed holes
  CHECK(e.disks->find_export("r") != nullptr);
  CHECK(e.rs->start_restore_disk("r",
                                 "/restorePointCollections/c/restorePoints/rp3/diskRestorePoints/a")
            .status()
            .code() == Code::kAlreadyExists);

  // Restore the VM.
  CHECK(e.rs->start_restore_vm("c", "rp1", "vm", {}).status().code() == Code::kConflict);
  auto vop = e.rs->start_restore_vm("c", "rp1", "new", {{"b", "new-bee"}});
  REQUIRE(vop.ok());
  REQUIRE(e.wait(vop.value()).status == "Succeeded");
  auto vm = e.rs->get_vm("new");
  REQUIRE(vm.ok());
  CHECK(vm->disks == std::vector<std::string>{"new-a", "new-bee"});
  CHECK(nlohmann::json::parse(RawJsonText(vm->configuration))["os"] == "linux");
  CHECK(e.file("new-a") == saved["rp1"]);
  CHECK(e.file("new-bee") == e.point("c", "rp1", "b"));

  // Deleting the collection takes its points with it.
  CHECK(e.rs->delete_collection("c").ok());
  CHECK(e.rs->exports().list_exports().empty());
  CHECK(e.rs->get_collection("c").status().code() == Code::kNotFound);
}

TEST_CASE("restore points: a deleted base stays the parent until the base moves on") {
  Env e;
  e.make_disk("a", kMiB);  // 16 blocks
  e.make_disk("b", kMiB);
  REQUIRE(e.rs->put_vm("vm", {"a", "b"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  e.write("a", 0, kGran, '1');
  auto rp1 = e.create_point("c", "rp1");
  Bytes a1 = e.file("a");
  // Only rp2 holds these 512 KiB (random, so no chunk is shared).
  {
    auto d = e.disks->file_disk("a");
    Bytes noise(8 * kGran);
    std::mt19937 rng(7);
    for (auto& ch : noise) ch = static_cast<char>(rng());
    REQUIRE(e.io(*d, IoKind::kWrite, 4 * kGran, noise.data(), noise.size()) == 0);
  }
  auto rp2 = e.create_point("c", "rp2");
  CHECK_FALSE(Dp(rp2, "a").full);
  const uint64_t kept = Dp(rp2, "a").store_point;
  REQUIRE(e.rs->delete_restore_point("c", "rp2").ok());
  CHECK(e.rs->get_restore_point("c", "rp2").status().code() == Code::kNotFound);
  CHECK(e.rs->exports().find_export("c/rp2/a") == nullptr);

  // A restart keeps the retained base (Open's orphan sweep must not take it).
  e.close();
  e.open();
  e.write("a", 4 * kGran, 8 * kGran, '3');
  e.write("a", 13 * kGran, 100, '3');
  auto rp3 = e.create_point("c", "rp3");
  CHECK_FALSE(Dp(rp3, "a").full);
  CHECK(Dp(rp3, "a").parent_store_point == kept);
  CHECK(Dp(rp3, "a").blocks_to_copy == 9);  // only the changed blocks
  CHECK(Dp(rp3, "a").bytes_stored <= 2 * kGran);
  CHECK_FALSE(Dp(rp3, "b").full);
  CHECK(Dp(rp3, "b").blocks_to_copy == 0);
  CHECK(e.point("c", "rp3", "a") == e.file("a"));
  CHECK(e.point("c", "rp1", "a") == a1);

  // rp3 is the base now: rp2's store point went, and GC frees its content.
  e.close();
  {
    auto st = store::Store::Open({e.region_dir()});
    REQUIRE(st.ok());
    CHECK(st.value()->point(kept).status().code() == Code::kNotFound);
    CHECK(st.value()->list_points()->size() == 4);  // rp1, rp3 (a and b)
    REQUIRE(st.value()->collect_garbage().ok());
    auto stats = st.value()->stats();
    REQUIRE(stats.ok());
    CHECK(stats->pack_bytes < 8 * kGran);  // the random 512 KiB are gone
  }
  e.open();
  CHECK(e.point("c", "rp3", "a") == e.file("a"));

  // The disk leaves the VM: its retained base is released; back in, it is full.
  REQUIRE(e.rs->delete_restore_point("c", "rp3").ok());
  REQUIRE(e.rs->put_vm("vm", {"b"}, nullptr).ok());
  REQUIRE(e.rs->put_vm("vm", {"a", "b"}, nullptr).ok());
  auto rp4 = e.create_point("c", "rp4");
  CHECK(Dp(rp4, "a").full);
  CHECK_FALSE(Dp(rp4, "b").full);
  CHECK(Dp(rp4, "b").parent_store_point == Dp(rp3, "b").store_point);
  CHECK(e.point("c", "rp4", "a") == e.file("a"));
  e.close();
  {
    auto st = store::Store::Open({e.region_dir()});
    REQUIRE(st.ok());
    CHECK(st.value()->point(Dp(rp3, "a").store_point).status().code() == Code::kNotFound);
    CHECK(st.value()->point(Dp(rp3, "b").store_point).status().code() == Code::kNotFound);
  }
  e.open();

  // Deleting the collection takes its retained bases with it.
  REQUIRE(e.rs->delete_restore_point("c", "rp4").ok());
  REQUIRE(e.rs->delete_collection("c").ok());
  e.close();
  {
    auto st = store::Store::Open({e.region_dir()});
    REQUIRE(st.ok());
    CHECK(st.value()->list_points()->empty());
  }
}

TEST_CASE("restore points: a crash while deleting the base keeps the retained base") {
  Env e;
  e.make_disk("a", kMiB);
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  e.write("a", 0, kGran, '1');
  e.create_point("c", "rp1");
  e.write("a", kGran, kGran, '2');
  auto rp2 = e.create_point("c", "rp2");
  e.close();
  // What delete_restore_point's first transaction leaves if the daemon dies
  // before the store points and rows are gone.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((e.tmp.path + "/meta.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db,
                       "UPDATE restore_points SET provisioning_state = 'Deleting' "
                       "WHERE name = 'rp2'; UPDATE tracking_bases SET retained = 1",
                       nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  e.open();
  CHECK(e.rs->get_restore_point("c", "rp2").status().code() == Code::kNotFound);
  e.write("a", 2 * kGran, kGran, '3');
  auto rp3 = e.create_point("c", "rp3");
  CHECK_FALSE(Dp(rp3, "a").full);
  CHECK(Dp(rp3, "a").parent_store_point == Dp(rp2, "a").store_point);
  CHECK(Dp(rp3, "a").blocks_to_copy == 1);
  CHECK(e.point("c", "rp3", "a") == e.file("a"));
}

TEST_CASE("restore points: a parent released during the freeze hook: that disk goes full") {
  TempDir dir;
  std::string go = dir.path + "/go", frozen = dir.path + "/frozen";
  std::map<std::string, FreezeHooks> hooks = {
      {"vm", {"touch " + frozen + "; while [ ! -e " + go + " ]; do sleep 0.01; done", "true"}}};
  Env e(dir.path, hooks);
  e.make_disk("a", kMiB);
  e.make_disk("b", kMiB);
  REQUIRE(e.rs->put_vm("vm", {"a", "b"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  e.write("a", 0, kGran, '1');
  e.write("b", 0, kGran, '1');
  e.create_point("c", "rp1");
  e.write("a", kGran, kGran, '2');
  auto rp2 = e.create_point("c", "rp2");
  REQUIRE(e.rs->delete_restore_point("c", "rp2").ok());  // a's and b's bases retained
  e.write("a", 2 * kGran, kGran, '3');
  e.write("b", 2 * kGran, kGran, '3');

  auto s = e.rs->create_restore_point("c", "rp3", {}, "FileSystemConsistent");
  REQUIRE(s.ok());
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!fs::exists(frozen)) {
    REQUIRE(std::chrono::steady_clock::now() < until);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  // Parents are chosen; "a" leaves the VM, which releases its retained base.
  REQUIRE(e.rs->put_vm("vm", {"b"}, nullptr).ok());
  { std::ofstream(go).close(); }
  auto op = e.wait(s->operation_id);
  CHECK_MESSAGE(op.status == "Succeeded", op.error_code << ": " << op.error_message);
  auto rp3 = e.rs->get_restore_point("c", "rp3");
  REQUIRE(rp3.ok());
  CHECK(Dp(rp3.value(), "a").full);
  CHECK(Dp(rp3.value(), "a").parent_store_point == 0);
  CHECK_FALSE(Dp(rp3.value(), "b").full);
  CHECK(Dp(rp3.value(), "b").parent_store_point == Dp(rp2, "b").store_point);
  CHECK(e.point("c", "rp3", "a") == e.file("a"));
  CHECK(e.point("c", "rp3", "b") == e.file("b"));
}

TEST_CASE("restore points: verify finds a corrupted pack byte") {
  Env e;
  e.make_disk("a", kMiB);
  for (int i = 0; i < 16; ++i)
    e.write("a", static_cast<uint64_t>(i) * kGran, kGran, static_cast<char>('A' + i));
  REQUIRE(e.rs->put_vm("vm", {"a"}, nullptr).ok());
  REQUIRE(e.rs->put_collection("c", "vm", "").ok());
  e.create_point("c", "rp1");
  auto op = e.rs->start_verify("c", "rp1");
  REQUIRE(op.ok());
  auto v = e.wait(op.value());
  REQUIRE(v.status == "Succeeded");
  CHECK(v.result["ok"] == true);
  CHECK(v.result["chunksChecked"] == 16);

  std::string pack;
  for (const auto& f : fs::recursive_directory_iterator(e.region_dir() + "/packs")) {
    if (f.path().extension() == ".pack") pack = f.path().string();
  }
  REQUIRE(!pack.empty());
  {
    std::fstream f(pack, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(4096 + 1000);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x5a;
    f.seekp(4096 + 1000);
    f.write(&c, 1);
  }
  op = e.rs->start_verify("c", "rp1");
  REQUIRE(op.ok());
  v = e.wait(op.value());
  REQUIRE(v.status == "Succeeded");
  CHECK(v.result["ok"] == false);
  REQUIRE(v.result["damage"].size() >= 1);
  MESSAGE(v.result.dump());
  bool chunk = false;
  for (const auto& d : v.result["damage"]) {
    if (d["kind"] == "Chunk") {
      chunk = true;
      CHECK(d["disk"] == "a");
      CHECK(d["length"] == kGran);
    }
  }
  CHECK(chunk);
}

TEST_CASE("restore points: SIGKILL during a point's copy; the next point has every change") {
  TempDir dir;
  std::string mark = dir.path + "/thawing";
  std::map<std::string, FreezeHooks> hooks = {
      {"vm", {"true", "echo $$ > " + dir.path + "/hook.pid; touch " + mark + "; exec sleep 1000"}}};
  std::cout.flush();  // or the child repeats what is buffered
  std::fflush(nullptr);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // The "daemon": one good point, more writes, a second point that the
    // parent kills (SIGKILL) between its cut and its copy.
    Env e(dir.path, hooks);
    e.make_disk("a", 2 * kMiB);
    e.write("a", 0, 4 * kGran, 'a');
    if (!e.rs->put_vm("vm", {"a"}, nullptr).ok()) ::_exit(2);
    if (!e.rs->put_collection("c", "vm", "").ok()) ::_exit(2);
    auto rp1 = e.rs->create_restore_point("c", "rp1", {}, "");
    if (!rp1.ok() || e.wait(rp1->operation_id).status != "Succeeded") ::_exit(3);
    e.write("a", 8 * kGran, kGran, 'b');  // before rp2's cut (hook holds the job after it)
    auto rp2 = e.rs->create_restore_point("c", "rp2", {}, "FileSystemConsistent");
    if (!rp2.ok()) ::_exit(4);
    while (!fs::exists(mark)) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    e.write("a", 9 * kGran, kGran, 'c');  // after rp2's cut
    { std::ofstream(dir.path + "/child-wrote").close(); }
    for (;;) ::pause();
  }
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!fs::exists(dir.path + "/child-wrote")) {
    int status = 0;
    REQUIRE_MESSAGE(::waitpid(pid, &status, WNOHANG) == 0, "child exited: " << status);
    REQUIRE(std::chrono::steady_clock::now() < until);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status));
  // The thaw hook (its own process group, pid = pgid) outlived the child.
  pid_t hook = 0;
  std::ifstream(dir.path + "/hook.pid") >> hook;
  REQUIRE(hook > 0);
  ::kill(-hook, SIGKILL);

  Env e(dir.path);  // no hooks this time
  auto p2 = e.rs->get_restore_point("c", "rp2");
  REQUIRE(p2.ok());
  CHECK(p2->provisioning_state == "Failed");
  CHECK(p2->error_message == "daemon restarted during creation");
  CHECK(e.rs->get_operation(p2->operation_id)->status == "Failed");
  auto rp1 = e.rs->get_restore_point("c", "rp1");
  REQUIRE(rp1.ok());
  CHECK(rp1->provisioning_state == "Succeeded");
  auto rp3 = e.create_point("c", "rp3");
  CHECK_FALSE(Dp(rp3, "a").full);
  CHECK(Dp(rp3, "a").parent_store_point == Dp(rp1.value(), "a").store_point);
  // Blocks 8 and 9; the generation active at the kill (block 9's) is widened
  // to its coarse tracking region: blocks 0-15 (1 MiB, engine/change_tracker.h).
  CHECK(Dp(rp3, "a").blocks_to_copy == 16);
  CHECK(e.point("c", "rp3", "a") == e.file("a"));
  Bytes want(2 * kMiB, 0);
  std::memset(want.data(), 'a', 4 * kGran);
  CHECK(e.point("c", "rp1", "a") == want);
}

TEST_CASE("hooks: environment, exit status, output tail, timeout kills the process group") {
  auto r =
      RunHook("echo \"$RPOINT_PHASE-$X\"; exit 7", {{"RPOINT_PHASE", "freeze"}, {"X", "y"}}, 5);
  CHECK(r.ran);
  CHECK_FALSE(r.timed_out);
  CHECK(r.exit_status == 7);
  CHECK(r.output_tail == "freeze-y\n");
  CHECK(DescribeHookFailure("freeze", "cmd", r) ==
        "freeze hook 'cmd' exited with status 7: freeze-y");
  auto t0 = std::chrono::steady_clock::now();
  r = RunHook("sleep 30 & sleep 30", {}, 1);
  CHECK(r.timed_out);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  CHECK(DescribeHookFailure("thaw", "x", r).find("timed out") != std::string::npos);
  r = RunHook("true", {}, 5);
  CHECK(r.exit_status == 0);
}

TEST_CASE("peer wire: a changed list needs a base, keeps holes as null, and is not 'chunks'") {
  PeerPull p;
  p.source_vm = "vm";
  p.source_restore_point = "/restorePointCollections/c/restorePoints/rp2";
  p.consistency_mode = "CrashConsistent";
  p.time_created = "2026-12-01T00:00:00Z";
  p.source_metadata = nlohmann::json::object();
  p.base_restore_point = "rp1";
  p.base_source_restore_point = "/restorePointCollections/c/restorePoints/rp1";
  p.base_time_created = "2026-11-30T00:00:00.000001Z";
  PeerPullDisk d;
  d.disk = "a";
  d.size_bytes = 1 << 20;
  d.granularity = d.chunk_size = 65536;
  d.uri = "nbds://10.0.0.1:10809/tok";
  store::Digest x;
  x.b[0] = 7;
  d.chunks = {{3, x}, {4, store::Digest{}}};
  d.changed = true;
  p.disks.push_back(d);
  nlohmann::json j = EncodePeerPull(p);
  CHECK(!j["disks"][0].contains("chunks"));  // an old peer refuses it (400)
  CHECK(j["disks"][0]["changedChunks"][1][1].is_null());
  CHECK(j["base"]["restorePoint"] == "rp1");
  auto back = DecodePeerPull(j);
  REQUIRE(back.ok());
  CHECK(back->base_restore_point == "rp1");
  CHECK(back->base_source_restore_point == p.base_source_restore_point);
  CHECK(back->base_time_created == p.base_time_created);
  REQUIRE(back->disks.size() == 1);
  CHECK(back->disks[0].changed);
  REQUIRE(back->disks[0].chunks.size() == 2);
  CHECK(back->disks[0].chunks[0].second == x);
  CHECK(back->disks[0].chunks[1].second.is_zero());

  nlohmann::json no_base = j;
  no_base.erase("base");
  CHECK(DecodePeerPull(no_base).status().code() == Code::kInvalidArgument);
  nlohmann::json both = j;
  both["disks"][0]["chunks"] = nlohmann::json::array();
  CHECK(DecodePeerPull(both).status().code() == Code::kInvalidArgument);
  nlohmann::json null_in_full = j;  // a full list has no holes
  null_in_full["disks"][0]["chunks"] = null_in_full["disks"][0]["changedChunks"];
  null_in_full["disks"][0].erase("changedChunks");
  CHECK(DecodePeerPull(null_in_full).status().code() == Code::kInvalidArgument);
  p.base_restore_point.clear();
  p.disks[0].changed = false;
  p.disks[0].chunks = {{3, x}};
  nlohmann::json full = EncodePeerPull(p);
  CHECK(!full.contains("base"));
  auto f = DecodePeerPull(full);
  REQUIRE(f.ok());
  CHECK(!f->disks[0].changed);
}
