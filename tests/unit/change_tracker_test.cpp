// Change tracking through the real engine: FileDisk + Reactor + io_uring on real
// files, and real SIGKILLs of a writer process.
#include "engine/change_tracker.h"

#include <doctest/doctest.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "engine/file_disk.h"

namespace fs = std::filesystem;
using namespace rpoint;

namespace {

constexpr uint32_t kGran = 64 * 1024;

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/rpoint-ct-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
};

struct Waiter final : IoRequest {
  std::atomic<int> result{1};
  void on_done(int r) override { result.store(r); }
};

// Runs a reactor on a thread for the life of the object.
struct Loop {
  std::unique_ptr<Reactor> reactor;
  std::thread thread;
  Loop()
      : reactor(std::move(Reactor::Create("test", 64)).value()),
        thread([this] { reactor->run(); }) {}
  ~Loop() {
    reactor->stop();
    thread.join();
  }
  int run(FileDisk& d, Waiter& w) {
    reactor->post([&] { d.submit(*reactor, w); });
    while (w.result.load() == 1) std::this_thread::sleep_for(std::chrono::microseconds(50));
    return w.result.load();
  }
};

int Write(Loop& loop, FileDisk& d, uint64_t off, std::vector<char>& buf) {
  Waiter w;
  w.kind = IoKind::kWrite;
  w.offset = off;
  w.length = buf.size();
  w.buf = buf.data();
  return loop.run(d, w);
}

std::vector<char> ReadFile(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("change tracker: only the first write into a coarse region waits for a sync") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 64 * kGran);  // 4 MiB: coarse regions of 1 MiB (16 blocks)
  auto disk = FileDisk::Open({"d", img, false, false, (tmp.path / "track").string(), kGran});
  REQUIRE(disk.ok());
  ChangeTracker* t = disk.value()->tracker();
  REQUIRE(t != nullptr);
  Loop loop;
  std::vector<char> buf(4096, 'a');
  CHECK(Write(loop, *disk.value(), 3 * kGran + 100, buf) == 0);
  CHECK(t->syncs() == 1);
  for (int i = 0; i < 20; ++i) CHECK(Write(loop, *disk.value(), 3 * kGran + i * 512, buf) == 0);
  CHECK(t->syncs() == 1);
  // Other blocks of the same region, a write spanning two of them included:
  // marked in memory, no sync (one sync per block before).
  CHECK(Write(loop, *disk.value(), 5 * kGran, buf) == 0);
  CHECK(Write(loop, *disk.value(), 10 * kGran - 10, buf) == 0);
  CHECK(t->syncs() == 1);
  // A write into the next region pays its intent sync.
  CHECK(Write(loop, *disk.value(), 20 * kGran, buf) == 0);
  CHECK(t->syncs() == 2);

  auto frozen = t->flip();
  REQUIRE(frozen.ok());
  SparseBitmap changed = t->changed();
  CHECK(changed.count() == 5);
  for (uint64_t b : {3, 5, 9, 10, 20}) CHECK(changed.test(b));
  CHECK(t->all_since_creation());
  // Writes after the flip go to the new generation only, with its own intent.
  CHECK(Write(loop, *disk.value(), 21 * kGran, buf) == 0);
  CHECK(t->syncs() == 3);
  CHECK(t->changed().count() == 5);
  CHECK(t->retire_through(frozen.value()).ok());
  CHECK(t->changed().count() == 0);
  CHECK_FALSE(t->all_since_creation());
}

TEST_CASE("change tracker: retirement sleeps until the old epoch's writes leave") {
  TempDir tmp;
  auto t = ChangeTracker::Open({(tmp.path / "track").string(), kGran, 64 * kGran});
  REQUIRE(t.ok());
  ChangeTracker& ct = *t.value();
  uint64_t ticket = ct.enter();  // a write in flight across the cut
  auto frozen = ct.flip();
  REQUIRE(frozen.ok());
  REQUIRE(ticket == frozen.value());
  uint64_t later = ct.enter();  // a write of the new epoch does not hold retirement
  CHECK_FALSE(ct.wait_writes_left(frozen.value(), std::chrono::milliseconds(50)));
  CHECK(ct.waiting_for_writes() == 0);
  // The last leave() of the epoch wakes the waiter at once (no polling).
  std::atomic<bool> retired{false};
  std::thread retirer([&] {
    CHECK(ct.retire_through(frozen.value()).ok());
    retired.store(true);
  });
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ct.waiting_for_writes() == 0) {
    REQUIRE(std::chrono::steady_clock::now() < until);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_FALSE(retired.load());
  auto left_at = std::chrono::steady_clock::now();
  ct.leave(ticket);
  retirer.join();
  CHECK(retired.load());
  CHECK(std::chrono::steady_clock::now() - left_at < std::chrono::seconds(5));
  CHECK(ct.wait_writes_left(frozen.value(), std::chrono::milliseconds(0)));
  ct.leave(later);
}

TEST_CASE("change tracker: arm says when the history after the base was retired") {
  // A consumer's base at g1 while a later point (through g2) was retired: a
  // metadata.db put back from before that point. Changes of g2 are gone, so
  // the history after g1 is not whole, also after a reopen; after g2 it is.
  TempDir tmp;
  std::string track = (tmp.path / "track").string();
  uint64_t g1 = 0, g2 = 0;
  {
    auto t = ChangeTracker::Open({track, kGran, 64 * kGran});
    REQUIRE(t.ok());
    ChangeTracker& ct = *t.value();
    auto f1 = ct.flip();
    REQUIRE(f1.ok());
    g1 = f1.value();
    REQUIRE(ct.retire_through(g1).ok());
    auto f2 = ct.flip();
    REQUIRE(f2.ok());
    g2 = f2.value();
    auto sw = std::make_shared<CutSwitch>();
    auto a = ct.arm(sw, g1);
    REQUIRE(a.ok());
    CHECK(a.value().history_gap.empty());  // g2 is still kept
    ct.disarm();
    REQUIRE(ct.retire_through(g2).ok());
    a = ct.arm(sw, g1);
    REQUIRE(a.ok());
    CHECK(a.value().history_gap.find("retired through " + std::to_string(g2)) != std::string::npos);
    CHECK_FALSE(ct.changed_since(g1, nullptr));
    ct.disarm();
  }
  auto t = ChangeTracker::Open({track, kGran, 64 * kGran});
  REQUIRE(t.ok());
  ChangeTracker& ct = *t.value();
  auto sw = std::make_shared<CutSwitch>();
  auto a = ct.arm(sw, g1);
  REQUIRE(a.ok());
  MESSAGE(a.value().history_gap);
  CHECK_FALSE(a.value().history_gap.empty());
  ct.disarm();
  a = ct.arm(sw, g2);
  REQUIRE(a.ok());
  CHECK(a.value().history_gap.empty());
  ct.disarm();
  // A base the tracker never froze (numbered at or past the active one).
  a = ct.arm(sw, ct.epoch() + 5);
  REQUIRE(a.ok());
  CHECK_FALSE(a.value().history_gap.empty());
  ct.disarm();
  // No particular base: the kept history, as it always was.
  a = ct.arm(sw, 0);
  REQUIRE(a.ok());
  CHECK(a.value().history_gap.empty());
  ct.disarm();
}

TEST_CASE("change tracker: a failed point keeps its generation; reopen recovers everything") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 64 * kGran);
  std::string track = (tmp.path / "track").string();
  {
    auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
    REQUIRE(disk.ok());
    Loop loop;
    std::vector<char> buf(kGran, 'b');
    CHECK(Write(loop, *disk.value(), 0, buf) == 0);
    auto g1 = disk.value()->tracker()->flip();
    REQUIRE(g1.ok());
    CHECK(disk.value()->tracker()->retire_through(g1.value()).ok());
    CHECK(Write(loop, *disk.value(), 5 * kGran, buf) == 0);
    // Cut 2 fails (never retired); more writes after it.
    REQUIRE(disk.value()->tracker()->flip().ok());
    CHECK(Write(loop, *disk.value(), 7 * kGran, buf) == 0);
  }
  auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
  REQUIRE(disk.ok());
  SparseBitmap changed = disk.value()->tracker()->changed();
  CHECK(changed.count() == 2);
  CHECK(changed.test(5));
  CHECK(changed.test(7));
  CHECK_FALSE(changed.test(0));
  CHECK_FALSE(disk.value()->tracker()->all_since_creation());
}

TEST_CASE("change tracker: grown disk tracks the new blocks") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 4 * kGran);
  auto disk = FileDisk::Open({"d", img, false, false, (tmp.path / "t").string(), kGran});
  REQUIRE(disk.ok());
  REQUIRE(disk.value()->grow(100 * kGran).ok());
  Loop loop;
  std::vector<char> buf(4096, 'c');
  CHECK(Write(loop, *disk.value(), 99 * kGran, buf) == 0);
  REQUIRE(disk.value()->tracker()->flip().ok());
  CHECK(disk.value()->tracker()->changed().test(99));
}

// The property that matters: after kill -9 at any moment, every block that differs
// from the last retired point is marked. A child process writes random data at
// random offsets with many requests in flight; the parent kills it at a random
// time, reopens the tracker and compares the file with its copy at the last point.
TEST_CASE("change tracker: kill -9 under a write load never loses a changed block") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  const uint64_t kBlocks = 256;  // 16 MiB
  {
    std::vector<char> init(kBlocks * kGran);
    std::mt19937_64 rng(1);
    for (auto& c : init) c = static_cast<char>(rng());
    std::ofstream(img, std::ios::binary).write(init.data(), init.size());
  }
  std::string track = (tmp.path / "track").string();
  std::vector<char> baseline = ReadFile(img);
  std::mt19937_64 rng(7);
  const int kRounds = 25;
  for (int round = 0; round < kRounds; ++round) {
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // Child: an endless random write load through the real engine.
      auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
      if (!disk.ok()) _exit(3);
      auto reactor = std::move(Reactor::Create("child", 64)).value();
      struct W final : IoRequest {
        std::vector<char> data = std::vector<char>(8192);
        std::mt19937_64* rng;
        FileDisk* disk;
        Reactor* r;
        void go() {
          kind = IoKind::kWrite;
          length = 512 + (*rng)() % 8192 / 512 * 512;
          if (length > data.size()) length = data.size();
          offset = (*rng)() % (kBlocks * kGran - length);
          for (auto& c : data) c = static_cast<char>((*rng)());
          buf = data.data();
          disk->submit(*r, *this);
        }
        void on_done(int res) override {
          if (res != 0) _exit(4);
          go();
        }
      };
      std::mt19937_64 crng(static_cast<uint64_t>(getpid()) * 31 + round);
      std::vector<std::unique_ptr<W>> ws;
      for (int i = 0; i < 16; ++i) {
        auto w = std::make_unique<W>();
        w->rng = &crng;
        w->disk = disk.value().get();
        w->r = reactor.get();
        ws.push_back(std::move(w));
      }
      reactor->post([&] {
        for (auto& w : ws) w->go();
      });
      reactor->run();
      _exit(0);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5 + rng() % 150));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    REQUIRE(WIFSIGNALED(status));

    auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
    REQUIRE(disk.ok());
    ChangeTracker* t = disk.value()->tracker();
    auto frozen = t->flip();
    REQUIRE(frozen.ok());
    SparseBitmap changed = t->changed();
    std::vector<char> now = ReadFile(img);
    REQUIRE(now.size() == baseline.size());
    uint64_t differing = 0, missed = 0;
    for (uint64_t b = 0; b < kBlocks; ++b) {
      bool differs = std::memcmp(now.data() + b * kGran, baseline.data() + b * kGran, kGran) != 0;
      differing += differs;
      if (differs && !changed.test(b)) ++missed;
    }
    INFO("round " << round << ": " << differing << " blocks differ, " << changed.count()
                  << " marked");
    CHECK(missed == 0);
    // "Restore point succeeded": the copy is the new baseline.
    baseline = std::move(now);
    REQUIRE(t->retire_through(frozen.value()).ok());
  }
}

TEST_CASE(
    "change tracker: a write that straddles a cut and fails after partly landing is re-marked") {
  // RLIMIT_FSIZE makes a real write land partly and then fail: the part below
  // the limit is written, the rest gets EFBIG.
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 64 * kGran);
  auto disk = FileDisk::Open({"d", img, false, false, (tmp.path / "track").string(), kGran});
  REQUIRE(disk.ok());
  ChangeTracker* t = disk.value()->tracker();
  Loop loop;
  const uint64_t limit = 16 * kGran + 4096;
  std::vector<char> buf(4096, 'a');
  REQUIRE(Write(loop, *disk.value(), 16 * kGran, buf) == 0);  // block 16 marked: fast path below

  struct rlimit old {};
  REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto old_sig = signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = limit;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0);

  // Submit, then cut before the reactor can see the completion: the write
  // entered in the old epoch and completes in the new one.
  std::vector<char> big(8192, 'b');
  Waiter w;
  w.kind = IoKind::kWrite;
  w.offset = limit - 4096;
  w.length = big.size();
  w.buf = big.data();
  Result<uint64_t> frozen = Status::Internal("not cut");
  loop.reactor->post([&] {
    disk.value()->submit(*loop.reactor, w);
    frozen = t->flip();
  });
  while (w.result.load() == 1) std::this_thread::sleep_for(std::chrono::microseconds(50));
  REQUIRE(setrlimit(RLIMIT_FSIZE, &old) == 0);
  signal(SIGXFSZ, old_sig);
  REQUIRE(frozen.ok());
  CHECK(w.result.load() == -EFBIG);
  std::vector<char> landed = ReadFile(img);
  CHECK(landed[limit - 1] == 'b');  // the first half did land

  // The point of the frozen generation may have copied block 16 before the
  // write landed; once it retires, the next generation must still hold it.
  REQUIRE(t->retire_through(frozen.value()).ok());
  REQUIRE(t->flip().ok());
  CHECK(t->changed().test(16));
}

TEST_CASE("change tracker: generation files are fully allocated before they become active") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  const uint64_t nblocks = 3 * SparseBitmap::kBitsPerPage + 5;  // four bitmap pages
  fs::resize_file(img, nblocks * kGran);
  auto disk = FileDisk::Open({"d", img, false, false, (tmp.path / "track").string(), kGran});
  REQUIRE(disk.ok());
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path / "track")) {
    if (e.path().extension() != ".ctbm") continue;
    ++files;
    struct stat st {};
    REQUIRE(stat(e.path().c_str(), &st) == 0);
    // Header + four pages, every one backed by blocks: marking never allocates.
    CHECK(static_cast<uint64_t>(st.st_size) == 4096 + 4 * SparseBitmap::kPageBytes);
    CHECK(static_cast<uint64_t>(st.st_blocks) * 512 >= 4096 + 4 * SparseBitmap::kPageBytes);
  }
  CHECK(files == 1);  // the active one; the next is made by the cut that needs it
  // The cut's preparation (before its pause) allocates the next one fully too.
  REQUIRE(disk.value()->tracker()->prepare_next().ok());
  files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path / "track")) {
    if (e.path().extension() != ".ctbm") continue;
    ++files;
    struct stat st {};
    REQUIRE(stat(e.path().c_str(), &st) == 0);
    CHECK(static_cast<uint64_t>(st.st_blocks) * 512 >= 4096 + 4 * SparseBitmap::kPageBytes);
  }
  CHECK(files == 2);
  // Growing the disk allocates the new pages at once too.
  REQUIRE(disk.value()->grow((nblocks + SparseBitmap::kBitsPerPage) * kGran).ok());
  for (const auto& e : fs::directory_iterator(tmp.path / "track")) {
    if (e.path().extension() != ".ctbm") continue;
    struct stat st {};
    REQUIRE(stat(e.path().c_str(), &st) == 0);
    CHECK(static_cast<uint64_t>(st.st_blocks) * 512 >= 4096 + 5 * SparseBitmap::kPageBytes);
  }
}

TEST_CASE(
    "change tracker: two consumers each see what they have not captured; retire at the oldest") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 64 * kGran);
  std::string track = (tmp.path / "track").string();
  uint64_t id = 0, ga = 0, gb = 0;
  {
    auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
    REQUIRE(disk.ok());
    ChangeTracker& t = *disk.value()->tracker();
    id = t.id();
    CHECK(id != 0);
    Loop loop;
    std::vector<char> buf(kGran, 'b');
    CHECK(Write(loop, *disk.value(), 1 * kGran, buf) == 0);
    auto g1 = t.flip();  // consumer A captures through g1
    REQUIRE(g1.ok());
    ga = g1.value();
    CHECK(Write(loop, *disk.value(), 2 * kGran, buf) == 0);
    auto g2 = t.flip();  // consumer B captures through g2
    REQUIRE(g2.ok());
    gb = g2.value();
    CHECK(Write(loop, *disk.value(), 3 * kGran, buf) == 0);
    auto g3 = t.flip();
    REQUIRE(g3.ok());
    // A lacks blocks 2 and 3, B only 3.
    SparseBitmap a = t.changed(ga), b = t.changed(gb);
    CHECK(a.count() == 2);
    CHECK(a.test(2));
    CHECK(a.test(3));
    CHECK(b.count() == 1);
    CHECK(b.test(3));
    CHECK(t.frozen_bitmaps(gb).size() == 1);
    // Retire through the oldest need (A's): B's generations stay.
    CHECK(t.retire_through(ga).ok());
    CHECK(t.frozen_generations() == std::vector<uint64_t>{gb, g3.value()});
    CHECK(t.changed(ga).count() == 2);
  }
  // After a crash and reopen: same identity, the kept generations and their
  // numbers are back, and numbering continues above them.
  auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
  REQUIRE(disk.ok());
  ChangeTracker& t = *disk.value()->tracker();
  CHECK(t.id() == id);
  CHECK(t.changed(ga).count() == 2);
  CHECK(t.changed(gb).count() == 1);
  CHECK(t.epoch() > gb + 1);
}

TEST_CASE("change tracker: numbering never goes back, even when every generation file is gone") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 64 * kGran);
  std::string track = (tmp.path / "track").string();
  uint64_t g = 0;
  {
    auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
    REQUIRE(disk.ok());
    ChangeTracker& t = *disk.value()->tracker();
    for (int i = 0; i < 5; ++i) {
      REQUIRE(t.prepare_next().ok());
      auto f = t.flip();
      REQUIRE(f.ok());
      g = f.value();
    }
    CHECK(t.retire_through(g).ok());
  }
  // A crash that leaves no generation file at all (the unmarked ones are
  // deleted at open): a consumer recorded generation g, so the next ones
  // must be numbered above it, or its "changed after g" would miss them.
  for (const auto& e : fs::directory_iterator(track)) {
    if (e.path().extension() == ".ctbm") fs::remove(e.path());
  }
  auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
  REQUIRE(disk.ok());
  Loop loop;
  std::vector<char> buf(kGran, 'c');
  CHECK(Write(loop, *disk.value(), 9 * kGran, buf) == 0);
  REQUIRE(disk.value()->tracker()->flip().ok());
  CHECK(disk.value()->tracker()->changed(g).count() == 1);
}

TEST_CASE("change tracker: a recreated tracker directory has another identity") {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  { std::ofstream(img).close(); }
  fs::resize_file(img, 16 * kGran);
  std::string track = (tmp.path / "track").string();
  uint64_t id1;
  {
    auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
    REQUIRE(disk.ok());
    id1 = disk.value()->tracker()->id();
  }
  fs::remove_all(track);
  auto disk = FileDisk::Open({"d", img, false, false, track, kGran});
  REQUIRE(disk.ok());
  CHECK(disk.value()->tracker()->id() != id1);
  CHECK(disk.value()->tracker()->all_since_creation());
}

namespace {

// A crash: SIGKILL of this process, no destructor runs.
[[noreturn]] void Crash() {
  kill(getpid(), SIGKILL);
  _exit(9);
}

// Runs `body` in a child process, which must end in Crash() (inside its own
// scope, before its tracker's destructor could stop it cleanly), and waits.
template <typename F>
void InKilledChild(F body) {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    body();
    _exit(8);  // body returned: its destructors ran, not a crash
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  REQUIRE(WTERMSIG(status) == SIGKILL);
}

// A power cut after a crash loses the page cache: every fine bitmap page that
// was never fdatasynced. The harshest such loss: every fine page of every
// generation file whose header says its fine bits may lag (the ones the
// tracker made complete keep theirs). Returns how many files were hit.
int LosePageCache(const std::string& track) {
  int hit = 0;
  for (const auto& e : fs::directory_iterator(track)) {
    if (e.path().extension() != ".ctbm") continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    uint32_t flags = 0;
    f.seekg(12);
    f.read(reinterpret_cast<char*>(&flags), sizeof flags);
    if (!(flags & 1)) continue;
    std::vector<char> zeros(fs::file_size(e.path()) - 4096, 0);
    f.seekp(4096);
    f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
    ++hit;
  }
  return hit;
}

// The header's kFineIncomplete flag (bit 0; bit 1 says it is checksummed).
uint32_t HeaderFlags(const fs::path& file) {
  std::ifstream f(file, std::ios::binary);
  uint32_t flags = 0;
  f.seekg(12);
  f.read(reinterpret_cast<char*>(&flags), sizeof flags);
  return flags & 1;
}

std::vector<uint64_t> SetBits(const SparseBitmap& b) {
  std::vector<uint64_t> out;
  for (uint64_t i = b.find_next(0); i < b.size(); i = b.find_next(i + 1)) out.push_back(i);
  return out;
}

std::vector<uint64_t> Range(uint64_t first, uint64_t last) {
  std::vector<uint64_t> out;
  for (uint64_t b = first; b <= last; ++b) out.push_back(b);
  return out;
}

// A 64-block (4 MiB) disk image and its tracking directory for the crash
// cases: coarse regions of 16 blocks.
struct CrashDisk {
  TempDir tmp;
  fs::path img = tmp.path / "disk.img";
  std::string track = (tmp.path / "track").string();
  CrashDisk() {
    { std::ofstream(img).close(); }
    fs::resize_file(img, 64 * kGran);
  }
  auto open() const { return FileDisk::Open({"d", img, false, false, track, kGran}); }
  // In a child process: opens the disk, runs body(disk, loop), then crashes
  // (kill -9: the tracker never stops cleanly). body _exit()s on a failure.
  template <typename F>
  void crash_after(F body) const {
    InKilledChild([&] {
      auto disk = open();
      if (!disk.ok()) _exit(3);
      Loop loop;
      body(*disk.value(), loop);
      Crash();
    });
  }
};

}  // namespace

TEST_CASE(
    "change tracker: an unclean stop widens the coarse regions; a lost page cache loses no "
    "change") {
  CrashDisk cd;  // coarse regions of 16 blocks
  const std::string& track = cd.track;
  cd.crash_after([](FileDisk& disk, Loop& loop) {
    std::vector<char> buf(4096, 'a');
    if (Write(loop, disk, 3 * kGran, buf) != 0) _exit(4);
    if (Write(loop, disk, 40 * kGran, buf) != 0) _exit(4);
    if (Write(loop, disk, 41 * kGran, buf) != 0) _exit(4);
  });
  CHECK(LosePageCache(track) == 1);  // the active generation was never made complete
  auto disk = cd.open();
  REQUIRE(disk.ok());
  ChangeTracker* t = disk.value()->tracker();
  REQUIRE(t->flip().ok());
  // Regions 0 (blocks 0-15) and 2 (32-47) whole; region 1 and 3 not.
  std::vector<uint64_t> want = Range(0, 15), r2 = Range(32, 47);
  want.insert(want.end(), r2.begin(), r2.end());
  CHECK(SetBits(t->changed()) == want);
}

TEST_CASE("change tracker: frozen and cleanly stopped generations are complete, not widened") {
  CrashDisk cd;
  const std::string& track = cd.track;
  cd.crash_after([](FileDisk& disk, Loop& loop) {
    std::vector<char> buf(4096, 'a');
    if (Write(loop, disk, 3 * kGran, buf) != 0) _exit(4);
    ChangeTracker* t = disk.tracker();
    if (!t->flip().ok()) _exit(5);  // a point that never retires (failed)
    if (!t->sync().ok() || t->finalized() != 1) _exit(6);
    if (Write(loop, disk, 40 * kGran, buf) != 0) _exit(4);
  });
  // The frozen generation's header says complete; the active one's does not.
  std::vector<uint32_t> flags;
  for (const auto& e : fs::directory_iterator(track)) {
    if (e.path().extension() == ".ctbm") flags.push_back(HeaderFlags(e.path()));
  }
  std::sort(flags.begin(), flags.end());
  CHECK(flags == std::vector<uint32_t>{0, 1});
  CHECK(LosePageCache(track) == 1);
  {
    auto disk = cd.open();
    REQUIRE(disk.ok());
    ChangeTracker* t = disk.value()->tracker();
    // The frozen generation exact (block 3), the crashed active one widened
    // (region 2: blocks 32-47).
    std::vector<uint64_t> want = {3};
    std::vector<uint64_t> r2 = Range(32, 47);
    want.insert(want.end(), r2.begin(), r2.end());
    CHECK(SetBits(t->changed()) == want);
    Loop loop;
    std::vector<char> buf(4096, 'b');
    CHECK(Write(loop, *disk.value(), 60 * kGran, buf) == 0);
  }  // a clean stop: the active generation is made complete
  for (const auto& e : fs::directory_iterator(track)) {
    if (e.path().extension() == ".ctbm") CHECK(HeaderFlags(e.path()) == 0);
  }
  CHECK(LosePageCache(track) == 0);
  auto disk = cd.open();
  REQUIRE(disk.ok());
  SparseBitmap all = disk.value()->tracker()->changed();
  CHECK(all.count() == 18);  // 3, 32-47 (as widened before), 60 exact
  CHECK(all.test(60));
  CHECK_FALSE(all.test(61));
}

TEST_CASE("change tracker: a grown disk's new blocks survive a crash and a lost page cache") {
  CrashDisk cd;  // coarse regions of 16 blocks, 32256 of them
  const std::string& track = cd.track;
  // Past the coarse map (32256 * 16 blocks): covered by widening everything past it.
  const uint64_t inside = 7999, past = ChangeTracker::kCoarseBits * 16 + 1000;
  cd.crash_after([&](FileDisk& disk, Loop& loop) {
    if (!disk.grow((past + 100) * kGran).ok()) _exit(5);
    std::vector<char> buf(4096, 'g');
    if (Write(loop, disk, inside * kGran, buf) != 0) _exit(4);
    if (Write(loop, disk, past * kGran, buf) != 0) _exit(4);
  });
  CHECK(LosePageCache(track) == 1);
  auto disk = cd.open();
  REQUIRE(disk.ok());
  ChangeTracker* t = disk.value()->tracker();
  REQUIRE(t->flip().ok());
  SparseBitmap c = t->changed();
  CHECK(c.test(inside));
  CHECK(c.test(past));
  // The region of `inside` (7984-7999) and every block past the map.
  CHECK(c.count() == 16 + (past + 100 - ChangeTracker::kCoarseBits * 16));
  CHECK_FALSE(c.test(7983));
}

TEST_CASE("change tracker: a retired generation stays gone after a crash; the active one widens") {
  CrashDisk cd;
  const std::string& track = cd.track;
  cd.crash_after([](FileDisk& disk, Loop& loop) {
    ChangeTracker* t = disk.tracker();
    std::vector<char> buf(4096, 'r');
    if (Write(loop, disk, 3 * kGran, buf) != 0) _exit(4);
    auto g = t->flip();
    // Retired at once: its write-behind may still be queued or running.
    if (!g.ok() || !t->retire_through(g.value()).ok()) _exit(5);
    if (Write(loop, disk, 40 * kGran, buf) != 0) _exit(4);
    if (!t->sync().ok()) _exit(6);
  });
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(track)) files += e.path().extension() == ".ctbm";
  CHECK(files == 1);
  CHECK(LosePageCache(track) == 1);
  auto disk = cd.open();
  REQUIRE(disk.ok());
  ChangeTracker* t = disk.value()->tracker();
  CHECK_FALSE(t->all_since_creation());
  CHECK(SetBits(t->changed()) == Range(32, 47));
}

namespace {

// The newest generation file of a tracking directory (the active one after a
// clean stop).
fs::path NewestGeneration(const std::string& track) {
  std::vector<fs::path> gens;
  for (const auto& e : fs::directory_iterator(track)) {
    if (e.path().extension() == ".ctbm") gens.push_back(e.path());
  }
  REQUIRE_FALSE(gens.empty());
  std::sort(gens.begin(), gens.end());
  return gens.back();
}

// Blocks 5 and 9 written after a retired point, then a clean stop: the
// active generation holds exactly {5, 9}, complete on disk. Returns the id.
uint64_t TwoChangesAfterARetiredPoint(const CrashDisk& cd) {
  auto disk = cd.open();
  REQUIRE(disk.ok());
  ChangeTracker* t = disk.value()->tracker();
  Loop loop;
  std::vector<char> buf(4096, 'p');
  REQUIRE(Write(loop, *disk.value(), 0, buf) == 0);
  auto g = t->flip();
  REQUIRE(g.ok());
  REQUIRE(t->retire_through(g.value()).ok());
  REQUIRE(Write(loop, *disk.value(), 5 * kGran, buf) == 0);
  REQUIRE(Write(loop, *disk.value(), 9 * kGran, buf) == 0);
  return t->id();
}

}  // namespace

TEST_CASE("change tracker: a damaged generation file drops the history loudly, never the disk") {
  // Zeroed, truncated into its header, a foreign granularity: which blocks
  // it marked is unknown. The disk must still open (a tracking file is an
  // optimisation, not the data), as a new tracker: another id (no consumer's
  // generation matches it, so every next copy is full) and never retired
  // (all_since_creation forces a full copy for bases recorded without an id).
  for (int how = 0; how < 3; ++how) {
    CAPTURE(how);
    CrashDisk cd;
    uint64_t id = TwoChangesAfterARetiredPoint(cd);
    fs::path gen = NewestGeneration(cd.track);
    if (how == 0) {
      std::vector<char> zeros(fs::file_size(gen), 0);
      std::ofstream(gen, std::ios::binary | std::ios::in | std::ios::out)
          .write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
    } else if (how == 1) {
      fs::resize_file(gen, 10);
    } else {
      std::fstream f(gen, std::ios::binary | std::ios::in | std::ios::out);
      uint32_t other = kGran * 2;
      f.seekp(8);
      f.write(reinterpret_cast<const char*>(&other), sizeof other);
    }
    auto disk = cd.open();
    REQUIRE(disk.ok());
    ChangeTracker* t = disk.value()->tracker();
    CHECK(t->id() != id);
    CHECK(t->all_since_creation());
    CHECK_FALSE(fs::exists(gen));
    // Tracking goes on from there.
    Loop loop;
    std::vector<char> buf(4096, 'q');
    CHECK(Write(loop, *disk.value(), 20 * kGran, buf) == 0);
    REQUIRE(t->flip().ok());
    CHECK(SetBits(t->changed()) == std::vector<uint64_t>{20});
  }
}

TEST_CASE("change tracker: a generation deleted or replaced, then a kill -9, drops the history") {
  // The active generation's file deleted (how 0) or replaced by a copy made
  // before its marks (how 1: another inode at its path) while the tracker
  // runs, then a crash before any file check: the open must not take what is
  // left for the whole history (blocks 5 and 9 would be missed) but start
  // over as a new tracker, as for an unreadable file.
  for (int how = 0; how < 2; ++how) {
    CAPTURE(how);
    CrashDisk cd;
    uint64_t id = 0;
    {
      auto disk = cd.open();
      REQUIRE(disk.ok());
      id = disk.value()->tracker()->id();
    }
    cd.crash_after([&](FileDisk& disk, Loop& loop) {
      ChangeTracker* t = disk.tracker();
      std::vector<char> buf(4096, 'p');
      if (Write(loop, disk, 0, buf) != 0) _exit(4);
      auto g = t->flip();
      if (!g.ok() || !t->retire_through(g.value()).ok()) _exit(5);
      fs::path active = NewestGeneration(cd.track);
      fs::path copy = active.string() + ".old";
      if (how == 1) fs::copy_file(active, copy);
      if (Write(loop, disk, 5 * kGran, buf) != 0) _exit(4);
      if (Write(loop, disk, 9 * kGran, buf) != 0) _exit(4);
      if (how == 0) fs::remove(active);
      if (how == 1) fs::rename(copy, active);
    });
    auto disk = cd.open();
    REQUIRE(disk.ok());
    ChangeTracker* t = disk.value()->tracker();
    CHECK(t->id() != id);
    CHECK(t->all_since_creation());
    // Tracking goes on from there, and a clean reopen keeps it.
    Loop loop;
    std::vector<char> buf(4096, 'q');
    CHECK(Write(loop, *disk.value(), 20 * kGran, buf) == 0);
    REQUIRE(t->flip().ok());
    CHECK(SetBits(t->changed()) == std::vector<uint64_t>{20});
    id = t->id();
    disk.value().reset();
    auto again = cd.open();
    REQUIRE(again.ok());
    CHECK(again.value()->tracker()->id() == id);
  }
}

TEST_CASE("change tracker: files lost while it runs drop the history at the next cut") {
  // The directory removed (rm -rf), the active generation's file deleted or
  // truncated, with the tracker open: the next cut must not fail, and must
  // drop the history (another id, never retired: the point is full); a stop
  // without a cut must leave no history with a hole for the restart.
  for (int how = 0; how < 4; ++how) {
    CAPTURE(how);
    TempDir tmp;
    fs::path img = tmp.path / "disk.img";
    { std::ofstream(img).close(); }
    fs::resize_file(img, 64 * kGran);
    fs::path track = tmp.path / "track";
    uint64_t id = 0;
    {
      auto disk = FileDisk::Open({"d", img, false, false, track.string(), kGran});
      REQUIRE(disk.ok());
      ChangeTracker* t = disk.value()->tracker();
      id = t->id();
      Loop loop;
      std::vector<char> buf(4096, 'w');
      CHECK(Write(loop, *disk.value(), 0, buf) == 0);
      auto g = t->flip();
      REQUIRE(g.ok());
      REQUIRE(t->retire_through(g.value()).ok());
      CHECK(Write(loop, *disk.value(), 9 * kGran, buf) == 0);
      fs::path active = NewestGeneration(track.string());
      if (how == 0) fs::remove_all(track);
      if (how == 1 || how == 3) fs::remove(active);
      if (how == 2) fs::resize_file(active, 0);
      CHECK(Write(loop, *disk.value(), 11 * kGran, buf) == 0);
      if (how != 3) {  // 3: a stop with no cut, then the restart below
        REQUIRE(t->prepare_next().ok());
        CHECK(t->id() != id);
        CHECK(t->all_since_creation());
        CHECK(fs::exists(track / "id"));
        // The cut goes on, and so does tracking, in the directory made anew.
        auto g2 = t->flip();
        REQUIRE(g2.ok());
        REQUIRE(t->retire_through(g2.value()).ok());
        CHECK(Write(loop, *disk.value(), 20 * kGran, buf) == 0);
        REQUIRE(t->flip().ok());
        CHECK(SetBits(t->changed(g2.value())) == std::vector<uint64_t>{20});
        CHECK(t->sync().ok());
        id = t->id();
      }
    }
    // Reopened: the history after the last retirement is whole (how 0-2), or
    // the tracker is a new one (how 3: the file with blocks 9 and 11 is gone).
    auto disk = FileDisk::Open({"d", img, false, false, track.string(), kGran});
    REQUIRE(disk.ok());
    ChangeTracker* t = disk.value()->tracker();
    if (how == 3) {
      CHECK(t->id() != id);
      CHECK(t->all_since_creation());
    } else {
      CHECK(t->id() == id);
      CHECK(SetBits(t->changed()) == std::vector<uint64_t>{20});
    }
  }
}

TEST_CASE("change tracker: a truncated generation counts the blocks it lost as changed") {
  // Generation files are allocated whole before a mark lands, so one shorter
  // than its disk needs lost bits: those blocks must count as changed, never
  // as unchanged (an incremental point would keep the parent's old data).
  for (uint64_t keep : {uint64_t{4096}, uint64_t{4096 + 1}}) {
    CAPTURE(keep);
    CrashDisk cd;
    uint64_t id = TwoChangesAfterARetiredPoint(cd);
    fs::resize_file(NewestGeneration(cd.track), keep);
    auto disk = cd.open();
    REQUIRE(disk.ok());
    ChangeTracker* t = disk.value()->tracker();
    CHECK(t->id() == id);
    SparseBitmap c = t->changed();
    CHECK(c.test(5));
    CHECK(c.test(9));
    // Cut at 4097, byte 0 (blocks 0-7) survived: block 5 exact, 8-63 unknown;
    // and the fine map no longer matches its checksum, so the generation is
    // widened too (its coarse region 0: blocks 0-15). Either way all 64.
    CHECK(c.count() == 64u);
  }
}

TEST_CASE("change tracker: writes only past the coarse map survive a clean stop and a crash") {
  // A disk grown more than 126x within one generation (made small, resized,
  // then used) has blocks past the coarse map; they are covered by widening
  // everything past it, which needs the header's flag durable. A generation
  // marked only there must still set it (and write its fine bits at a stop).
  const uint64_t past = ChangeTracker::kCoarseBits * 16 + 1000;
  for (bool crash : {false, true}) {
    CAPTURE(crash);
    CrashDisk cd;  // coarse regions of 16 blocks
    // 0 once written (then a clean stop, or the crash), else where it failed.
    auto run = [&]() -> int {
      auto disk = cd.open();
      if (!disk.ok()) return 3;
      if (!disk.value()->grow((past + 100) * kGran).ok()) return 5;
      Loop loop;
      std::vector<char> buf(4096, 'g');
      if (Write(loop, *disk.value(), past * kGran, buf) != 0) return 4;
      if (crash) Crash();
      return 0;
    };
    if (crash) {
      InKilledChild([&] { _exit(run()); });
      LosePageCache(cd.track);
    } else {
      REQUIRE(run() == 0);
    }
    auto disk = cd.open();
    REQUIRE(disk.ok());
    ChangeTracker* t = disk.value()->tracker();
    REQUIRE(t->flip().ok());
    CHECK(t->changed().test(past));
  }
}

namespace {

// A tracking directory left by a kill -9 with known writes, for the bit-flip
// cases: generation 1 retired (block 0); generation 2 frozen by a point that
// failed and made complete on disk (blocks 5, 9, 33: only its fine map says
// so); generation 3 active at the crash (blocks 20, 50, 63: only its coarse
// map, regions 1 and 3, says so). Coarse regions of 16 blocks.
struct CrashedTracking {
  CrashDisk cd;
  const std::vector<uint64_t> known = {5, 9, 20, 33, 50, 63};
  fs::path frozen, active;  // the generation files 2 and 3
  uint64_t id = 0;
  CrashedTracking() {
    cd.crash_after([](FileDisk& disk, Loop& loop) {
      ChangeTracker* t = disk.tracker();
      std::vector<char> buf(4096, 'k');
      auto write = [&](uint64_t b) {
        if (Write(loop, disk, b * kGran, buf) != 0) _exit(4);
      };
      write(0);
      auto g = t->flip();
      if (!g.ok() || !t->retire_through(g.value()).ok()) _exit(5);
      for (uint64_t b : {5, 9, 33}) write(b);
      if (!t->flip().ok() || !t->sync().ok()) _exit(6);
      for (uint64_t b : {20, 50, 63}) write(b);
    });
    std::vector<fs::path> gens;
    for (const auto& e : fs::directory_iterator(cd.track)) {
      if (e.path().extension() == ".ctbm") gens.push_back(e.path());
    }
    std::sort(gens.begin(), gens.end());
    REQUIRE(gens.size() == 2);
    frozen = gens[0];
    active = gens[1];
    REQUIRE(HeaderFlags(frozen) == 0);
    REQUIRE(HeaderFlags(active) == 1);
    std::ifstream f(cd.track + "/id");
    f >> std::hex >> id;
    REQUIRE(id != 0);
  }
};

// What a tracker opened on `dir` makes of it: history dropped (a new id and
// never retired: every next point is full) or kept, with the changes it has.
struct Outcome {
  bool opened = false, dropped = false;
  SparseBitmap changed;
};

Outcome OpenTracking(const fs::path& dir, uint64_t id) {
  Outcome o;
  auto t = ChangeTracker::Open({dir.string(), kGran, 64 * kGran});
  if (!t.ok()) return o;
  o.opened = true;
  o.dropped = t.value()->id() != id && t.value()->all_since_creation();
  o.changed = t.value()->changed();
  return o;
}

void FlipBit(const fs::path& file, uint64_t offset, int bit) {
  std::fstream f(file, std::ios::binary | std::ios::in | std::ios::out);
  char c = 0;
  f.seekg(static_cast<std::streamoff>(offset));
  f.read(&c, 1);
  c = static_cast<char>(c ^ (1 << bit));
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
  REQUIRE(f.good());
}

}  // namespace

TEST_CASE("change tracker: no flipped bit in a crashed tracking file loses a change") {
  // The product rule: after any single flipped bit in a generation file the
  // next point still holds every write (the changes cover them, over-reports
  // allowed) or is full (the history dropped). A cleared coarse bit, a flipped
  // coarse shift or incomplete flag, a cleared fine bit of a complete
  // generation: each would otherwise make an incremental point miss a write.
  // Every bit of the header fields and of the first coarse words, one bit of
  // every other header byte, every bit of the fine bytes that hold marks and
  // one bit in every 37th other fine byte; in both generation files. Each
  // flip is opened on a fresh copy (in /dev/shm: thousands of fdatasyncs).
  CrashedTracking ct;
  std::string tmpl =
      (fs::exists("/dev/shm") ? "/dev/shm" : "/tmp") + std::string("/rpoint-ctflip-XXXXXX");
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  struct Cleanup {
    fs::path p;
    ~Cleanup() { fs::remove_all(p); }
  } scratch{tmpl};
  std::vector<std::pair<uint64_t, int>> targets;
  const uint64_t fine_bytes = fs::file_size(ct.frozen) - 4096;
  for (uint64_t off = 0; off < 4096; ++off) {
    if (off < 128) {
      for (int b = 0; b < 8; ++b) targets.emplace_back(off, b);
    } else {
      targets.emplace_back(off, static_cast<int>(off % 8));
    }
  }
  for (uint64_t off = 0; off < fine_bytes; ++off) {
    if (off < 8) {
      for (int b = 0; b < 8; ++b) targets.emplace_back(4096 + off, b);
    } else if (off % 37 == 0) {
      targets.emplace_back(4096 + off, static_cast<int>(off % 8));
    }
  }
  auto level = spdlog::get_level();
  spdlog::set_level(spdlog::level::off);  // thousands of "history dropped" errors
  int dropped = 0, covered = 0;
  std::vector<std::string> lost;
  for (const fs::path& file : {ct.frozen, ct.active}) {
    for (auto [off, bit] : targets) {
      fs::path dir = scratch.p / "t";
      fs::remove_all(dir);
      fs::copy(ct.cd.track, dir);
      FlipBit(dir / file.filename(), off, bit);
      Outcome o = OpenTracking(dir, ct.id);
      bool all = o.opened;
      for (uint64_t b : ct.known) all = all && o.changed.test(b);
      if (o.opened && o.dropped) {
        ++dropped;
      } else if (all) {
        ++covered;
      } else if (lost.size() < 20) {
        lost.push_back(file.filename().string() + " byte " + std::to_string(off) + " bit " +
                       std::to_string(bit) + (o.opened ? "" : " (open failed)"));
      } else {
        lost.push_back("...");
      }
    }
  }
  spdlog::set_level(level);
  MESSAGE((2 * targets.size()) << " flips: " << dropped << " dropped the history, " << covered
                               << " kept every change, " << lost.size() << " lost one");
  for (const auto& l : lost) MESSAGE("lost a change: " << l);
  CHECK(lost.empty());
  // Unflipped, the crashed files are exact where complete, widened where not.
  Outcome clean = OpenTracking(fs::path(ct.cd.track), ct.id);
  REQUIRE(clean.opened);
  CHECK_FALSE(clean.dropped);
  std::vector<uint64_t> want = {5, 9, 33};
  for (uint64_t b : Range(16, 31)) want.push_back(b);
  for (uint64_t b : Range(48, 63)) want.push_back(b);
  std::sort(want.begin(), want.end());
  CHECK(SetBits(clean.changed) == want);
}

TEST_CASE("change tracker: files of daemons without checksums still load as they did") {
  // The same crash, its headers rewritten as a daemon before checksums wrote
  // them: no kChecksummed flag, zero where the checksum fields are now.
  CrashedTracking ct;
  for (const fs::path& file : {ct.frozen, ct.active}) {
    std::fstream f(file, std::ios::binary | std::ios::in | std::ios::out);
    uint32_t flags = 0;
    f.seekg(12);
    f.read(reinterpret_cast<char*>(&flags), sizeof flags);
    REQUIRE((flags & 2) != 0);
    flags &= 1;
    f.seekp(12);
    f.write(reinterpret_cast<const char*>(&flags), sizeof flags);
    std::vector<char> zeros(64 - 28, 0);
    f.seekp(28);
    f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
    REQUIRE(f.good());
  }
  {
    auto t = ChangeTracker::Open({ct.cd.track, kGran, 64 * kGran});
    REQUIRE(t.ok());
    CHECK(t.value()->id() == ct.id);
    CHECK_FALSE(t.value()->all_since_creation());
    std::vector<uint64_t> want = {5, 9, 33};
    for (uint64_t b : Range(16, 31)) want.push_back(b);
    for (uint64_t b : Range(48, 63)) want.push_back(b);
    std::sort(want.begin(), want.end());
    CHECK(SetBits(t.value()->changed()) == want);
  }  // the widened old generation is written back complete, now checksummed
  auto t = ChangeTracker::Open({ct.cd.track, kGran, 64 * kGran});
  REQUIRE(t.ok());
  CHECK(t.value()->id() == ct.id);
  CHECK(t.value()->changed().count() == 3 + 16 + 16);
}

TEST_CASE("change tracker: a fine map that fails its checksum is widened, not trusted") {
  // A cleared fine bit of a complete generation (block 33's): the header is
  // sound, so its coarse map (regions 0 and 2) is widened, as after a crash;
  // the history stays.
  CrashedTracking ct;
  FlipBit(ct.frozen, 4096 + 33 / 8, 33 % 8);
  {
    auto t = ChangeTracker::Open({ct.cd.track, kGran, 64 * kGran});
    REQUIRE(t.ok());
    CHECK(t.value()->id() == ct.id);
    // Regions 0 and 2 widened here (trusted, the fine map would say 5, 9),
    // 1 and 3 by the crash: all 64 blocks.
    CHECK(t.value()->changed().count() == 64);
  }
  // Written back complete with a fresh checksum: the same on the next open.
  auto t = ChangeTracker::Open({ct.cd.track, kGran, 64 * kGran});
  REQUIRE(t.ok());
  CHECK(t.value()->id() == ct.id);
  CHECK(t.value()->changed().count() == 64);
}
