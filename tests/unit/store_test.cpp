// Unit tests for the restore point store (store/): points, sharing, dedup,
// holes, growth, deletion, GC (also concurrent with writers), verify, crash
// leftovers, and the read-only BlockDevice served through a real Reactor.
//
// Regions live under $TMPDIR (default /var/tmp) and are removed afterwards.
#include "store/store.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/fault_injection.h"
#include "common/thread_role.h"
#include "common/unique_fd.h"
#include "engine/block_device.h"
#include "engine/reactor.h"
#include "store/file_util.h"
#include "store/pack.h"
#include "store/point_device.h"
#include "store/point_reader.h"
#include "store/point_writer.h"

namespace rpoint::store {
namespace {

using namespace std::chrono_literals;
constexpr uint32_t kCs = 64 * 1024;  // chunk size used by most tests

#define REQUIRE_OK(expr)                              \
  do {                                                \
    auto _s = (expr);                                 \
    INFO(#expr);                                      \
    REQUIRE_MESSAGE(_s.ok(), _s.status().ToString()); \
  } while (0)

// Result<T> or Status: both answer ok() / status().
struct StatusView {
  Status s;
  bool ok() const { return s.ok(); }
  const Status& status() const { return s; }
};
StatusView V(Status s) {
  return {std::move(s)};
}

template <typename T>
T Take(Result<T> r) {
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return std::move(r).value();
}

class TmpDir {
 public:
  // `parent`: where (default $TMPDIR, else /var/tmp).
  explicit TmpDir(const char* parent = nullptr) {
    const char* t = parent ? parent : std::getenv("TMPDIR");
    std::string tmpl = std::string(t && *t ? t : "/var/tmp") + "/store_test.XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  ~TmpDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string region() const { return path_ + "/region"; }

 private:
  std::string path_;
};

StoreOptions Opts(const std::string& dir) {
  StoreOptions o;
  o.dir = dir;
  o.pack_target_bytes = 1 << 20;  // small packs: many packs even in small tests
  o.pack_buffer_bytes = 256 << 10;
  return o;
}

std::shared_ptr<Store> Open(const std::string& dir) {
  return Take(Store::Open(Opts(dir)));
}

// Deterministic pseudo-random bytes.
void Fill(char* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, std::min<size_t>(8, n - i));
  }
}

// An in-memory model of a disk image, cut in chunks of `cs` bytes.
struct Image {
  explicit Image(uint64_t size, uint32_t chunk = kCs) : bytes(size, 0), cs(chunk) {}
  std::vector<char> bytes;
  uint32_t cs;
  uint64_t size() const { return bytes.size(); }
  uint64_t slots() const { return (size() + cs - 1) / cs; }
  char* slot(uint64_t s) { return bytes.data() + s * cs; }
  size_t slot_len(uint64_t s) const { return size_t(std::min<uint64_t>(cs, size() - s * cs)); }
  void random_slot(uint64_t s, uint64_t seed) { Fill(slot(s), slot_len(s), seed); }
  void zero_slot(uint64_t s) { std::memset(slot(s), 0, slot_len(s)); }
  void grow(uint64_t n) { bytes.resize(n, 0); }
};

std::vector<uint64_t> AllSlots(const Image& im) {
  std::vector<uint64_t> v(im.slots());
  for (uint64_t i = 0; i < v.size(); ++i) v[i] = i;
  return v;
}

PointInfo Commit(Store& st, PointId parent, Image& im, const std::vector<uint64_t>& slots,
                 const std::string& tag = "") {
  PointParams p;
  p.parent = parent;
  p.size = im.size();
  p.chunk_size = im.cs;
  p.tag = tag;
  auto w = Take(st.begin_point(p));
  for (uint64_t s : slots) REQUIRE_OK(V(w->put(s, im.slot(s), im.slot_len(s))));
  return Take(w->commit());
}

void CheckRead(Store& st, PointId id, const Image& im) {
  auto r = Take(st.open_point(id));
  REQUIRE(r->size() == im.size());
  std::vector<char> got(im.size());
  REQUIRE_OK(V(r->read(0, got.size(), got.data())));
  REQUIRE(std::memcmp(got.data(), im.bytes.data(), got.size()) == 0);
  // Unaligned pieces across chunk borders.
  std::mt19937_64 rng(id);
  for (int i = 0; i < 50 && im.size() > 0; ++i) {
    uint64_t off = rng() % im.size();
    uint64_t len = std::min<uint64_t>(im.size() - off, rng() % (3 * im.cs) + 1);
    std::vector<char> b(len);
    REQUIRE_OK(V(r->read(off, len, b.data())));
    REQUIRE(std::memcmp(b.data(), im.bytes.data() + off, len) == 0);
  }
}

uint64_t PackBytesOnDisk(const std::string& region) {
  uint64_t total = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(region + "/packs")) {
    if (e.is_regular_file()) total += e.file_size();
  }
  return total;
}

std::vector<std::string> PackFiles(const std::string& region) {
  std::vector<std::string> v;
  for (auto& e : std::filesystem::recursive_directory_iterator(region + "/packs")) {
    if (e.is_regular_file()) v.push_back(e.path().string());
  }
  std::sort(v.begin(), v.end());
  return v;
}

// The extents a model image should report, at chunk granularity.
std::vector<Extent> ModelExtents(const Image& im) {
  std::vector<Extent> v;
  for (uint64_t s = 0; s < im.slots(); ++s) {
    bool hole = IsAllZero(im.bytes.data() + s * im.cs, im.slot_len(s));
    uint32_t f = hole ? (Extent::kHole | Extent::kZero) : 0;
    if (!v.empty() && v.back().flags == f) {
      v.back().length += im.slot_len(s);
    } else {
      v.push_back(Extent{im.slot_len(s), f});
    }
  }
  return v;
}

bool SameExtents(const std::vector<Extent>& a, const std::vector<Extent>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].length != b[i].length || a[i].flags != b[i].flags) return false;
  }
  return true;
}

// Flips one byte of an object of `kind` in some pack; returns the entry.
PackEntry CorruptOne(const std::string& region, ObjectKind kind, const Digest* only = nullptr) {
  for (const std::string& path : PackFiles(region)) {
    UniqueFd fd(::open(path.c_str(), O_RDWR));
    REQUIRE(fd.valid());
    std::string name = std::filesystem::path(path).filename();
    auto id = ParsePackName(name);
    REQUIRE(id.has_value());
    auto entries = Take(ReadPackTrailer(fd.get(), *id));
    for (const PackEntry& e : entries) {
      if (e.kind != uint8_t(kind) || (only && e.digest != *only)) continue;
      char c;
      REQUIRE(::pread(fd.get(), &c, 1, off_t(e.offset + 100)) == 1);
      c ^= 0x5a;
      REQUIRE(::pwrite(fd.get(), &c, 1, off_t(e.offset + 100)) == 1);
      return e;
    }
  }
  FAIL("no object of the wanted kind found");
  return {};
}

}  // namespace

TEST_CASE("store: full point reads back exactly, extents follow the data, verify is clean") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(40 * kCs + 5000);  // a partial last chunk
  for (uint64_t s = 0; s < im.slots(); ++s) {
    if (s % 7 != 3) im.random_slot(s, s + 1);  // every 7th slot stays a hole
  }
  auto info = Commit(*st, 0, im, AllSlots(im), "disk-a");
  CHECK(info.id != 0);
  CHECK(info.size == im.size());
  CHECK(info.tag == "disk-a");
  CHECK(info.new_chunks == im.slots() - 6);
  CheckRead(*st, info.id, im);

  auto r = Take(st->open_point(info.id));
  auto ex = Take(r->extents(0, im.size()));
  CHECK(SameExtents(ex, ModelExtents(im)));
  auto rep = Take(st->verify(info.id));
  CHECK(rep.ok());
  CHECK(rep.chunks_checked == im.slots() - 6);
  CHECK(rep.pages_checked == 1);

  // Reopening the region finds the same point.
  r.reset();
  st.reset();
  st = Open(tmp.region());
  auto again = Take(st->point(info.id));
  CHECK(again.root == info.root);
  CheckRead(*st, info.id, im);
}

TEST_CASE("store: incremental point rewrites only changed pages and shares the rest") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(1024 * 16384, 16384);  // 1024 slots: 8 leaf pages + a root (depth 2)
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, s + 100);
  auto p1 = Commit(*st, 0, im, AllSlots(im));
  CHECK(p1.depth == 2);
  CHECK(p1.new_pages == 9);

  im.random_slot(300, 9999);  // leaf 2
  auto p2 = Commit(*st, p1.id, im, {300});
  CHECK(p2.parent == p1.id);
  CHECK(p2.new_chunks == 1);
  CHECK(p2.new_pages == 2);  // the changed leaf and the root
  CHECK(p2.put_slots == 1);
  CheckRead(*st, p2.id, im);

  auto r1 = Take(st->open_point(p1.id));
  auto r2 = Take(st->open_point(p2.id));
  for (uint64_t leaf = 0; leaf < 8; ++leaf) {
    Digest a = Take(r1->node(1, leaf)), b = Take(r2->node(1, leaf));
    if (leaf == 2) {
      CHECK(a != b);
    } else {
      CHECK(a == b);  // shared with the parent by digest
    }
  }
  CHECK(Take(r1->node(2, 0)) != Take(r2->node(2, 0)));

  // No change at all: the same tree, nothing written.
  auto p3 = Commit(*st, p2.id, im, {});
  CHECK(p3.root == p2.root);
  CHECK(p3.new_pages == 0);
  CHECK(p3.new_chunks == 0);
  // Putting a slot with its unchanged content writes no chunk and no page.
  auto p4 = Commit(*st, p3.id, im, {5, 6});
  CHECK(p4.root == p3.root);
  CHECK(p4.new_chunks == 0);
  CHECK(p4.new_pages == 0);
}

TEST_CASE("store: chunks are deduplicated across disks and within a disk") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image a(64 * kCs);
  for (uint64_t s = 0; s < a.slots(); ++s) a.random_slot(s, s % 16);  // 16 distinct chunks
  auto pa = Commit(*st, 0, a, AllSlots(a), "vm1-disk0");
  CHECK(pa.new_chunks == 16);
  uint64_t bytes_a = Take(st->stats()).pack_bytes;

  // Another VM's disk with the same content, written by two writers at once.
  Image b = a;
  PointParams p;
  p.size = b.size();
  p.chunk_size = kCs;
  auto w1 = Take(st->begin_point(p));
  auto w2 = Take(st->begin_point(p));
  for (uint64_t s = 0; s < b.slots(); ++s) {
    REQUIRE_OK(V(w1->put(s, b.slot(s), kCs)));
    REQUIRE_OK(V(w2->put(b.slots() - 1 - s, b.slot(b.slots() - 1 - s), kCs)));
  }
  auto pb = Take(w1->commit());
  auto pc = Take(w2->commit());
  CHECK(pb.new_chunks == 0);
  CHECK(pc.new_chunks == 0);
  CHECK(pb.root == pa.root);
  CHECK(pc.root == pa.root);
  CheckRead(*st, pb.id, b);
  CheckRead(*st, pc.id, b);
  auto s2 = Take(st->stats());
  CHECK(s2.pack_bytes == bytes_a);  // not one more byte
  CHECK(s2.points == 3);
}

TEST_CASE("store: writers of different disks run in parallel, even on the same new data") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image same(96 * kCs), other(96 * kCs);
  for (uint64_t s = 0; s < same.slots(); ++s) {
    same.random_slot(s, 70'000 + s);
    other.random_slot(s, 80'000 + s);
  }
  PointInfo a, b, c;
  std::thread ta([&] { a = Commit(*st, 0, same, AllSlots(same), "vm1"); });
  std::thread tb([&] { b = Commit(*st, 0, same, AllSlots(same), "vm2"); });
  std::thread tc([&] { c = Commit(*st, 0, other, AllSlots(other), "vm3"); });
  ta.join();
  tb.join();
  tc.join();
  CHECK(a.root == b.root);
  CHECK(a.id != b.id);
  // In flight, the same new chunk may be stored by both (the index keeps one);
  // never less than once.
  CHECK(a.new_chunks + b.new_chunks >= 96);
  CheckRead(*st, a.id, same);
  CheckRead(*st, b.id, same);
  CheckRead(*st, c.id, other);
  for (PointId id : {a.id, b.id, c.id}) CHECK(Take(st->verify(id)).ok());
  // Duplicate copies are dead space that GC reclaims once a pack is mostly dead.
  REQUIRE_OK(V(st->delete_point(c.id)));
  Take(st->collect_garbage());
  CheckRead(*st, a.id, same);
  CHECK(Take(st->verify(b.id)).ok());
}

TEST_CASE("store: holes stay holes (zero data, trims, partial tail)") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(20 * kCs + 4096);
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, s + 7);
  auto p1 = Commit(*st, 0, im, AllSlots(im));

  PointParams pp;
  pp.parent = p1.id;
  pp.size = im.size();
  pp.chunk_size = kCs;
  auto w = Take(st->begin_point(pp));
  std::vector<char> zeros(kCs, 0);
  im.zero_slot(3);
  REQUIRE_OK(V(w->put(3, zeros.data(), kCs)));  // zero data
  im.zero_slot(4);
  REQUIRE_OK(V(w->put_hole(4)));  // trimmed
  im.zero_slot(20);
  REQUIRE_OK(V(w->put(20, zeros.data(), 4096)));  // the partial tail
  auto p2 = Take(w->commit());
  CHECK(p2.new_chunks == 0);
  CheckRead(*st, p2.id, im);
  auto r = Take(st->open_point(p2.id));
  for (uint64_t s : {3, 4, 20}) CHECK(Take(r->slot_digest(s)).is_zero());
  auto ex = Take(r->extents(0, im.size()));
  CHECK(SameExtents(ex, ModelExtents(im)));
  // max_extents is honoured and the answer still starts at the offset.
  auto ex2 = Take(r->extents(kCs + 10, im.size() - kCs - 10, 2));
  REQUIRE(ex2.size() == 2);
  CHECK(ex2[0].flags == 0);
  CHECK(ex2[0].length == 2 * kCs - 10);
  CHECK(ex2[1].flags == (Extent::kHole | Extent::kZero));

  // A disk with no data at all: an all-hole tree with a zero root, no objects.
  Image empty(100 * kCs);
  auto pe = Commit(*st, 0, empty, AllSlots(empty));
  CHECK(pe.root.is_zero());
  CHECK(pe.new_pages == 0);
  CheckRead(*st, pe.id, empty);
}

// The changed map a digest diff must give: slot s differs when its bytes
// (zero-padded to the chunk, zeroes past an image's end) differ.
std::vector<Extent> ModelChanged(const Image& self, const Image& other) {
  std::vector<Extent> v;
  std::vector<char> a(self.cs), b(self.cs);
  for (uint64_t s = 0; s < self.slots(); ++s) {
    std::fill(a.begin(), a.end(), 0);
    std::fill(b.begin(), b.end(), 0);
    std::memcpy(a.data(), self.bytes.data() + s * self.cs, self.slot_len(s));
    if (s < other.slots())
      std::memcpy(b.data(), other.bytes.data() + s * other.cs, other.slot_len(s));
    uint32_t f = a == b ? 0 : MetaContext::kDirty;
    if (!v.empty() && v.back().flags == f) {
      v.back().length += self.slot_len(s);
    } else {
      v.push_back(Extent{self.slot_len(s), f});
    }
  }
  return v;
}

TEST_CASE("store: changed_extents marks exactly the slots that differ, across tree depths") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  constexpr uint32_t cs = 4096;
  Image a(200 * cs + 1000, cs);  // depth 2, partial tail
  for (uint64_t s = 0; s < a.slots(); ++s) {
    if (s % 5 != 2) a.random_slot(s, s + 7);
  }
  auto p1 = Commit(*st, 0, a, AllSlots(a));
  Image b = a;
  b.grow(uint64_t(20000) * cs);   // depth 3
  b.random_slot(5, 1);            // overwritten
  b.random_slot(150, 2);          // another leaf
  std::memset(b.slot(9), 0, cs);  // zeroed: stored as a hole now
  b.random_slot(12, 3);           // data in a former hole
  b.random_slot(19990, 4);        // past the old end
  // Slot 8 is put again with identical bytes: same digest, unchanged.
  auto p2 = Commit(*st, p1.id, b, {5, 150, 9, 12, 19990, 8});
  CHECK(p1.depth == 2);
  CHECK(p2.depth == 3);
  auto r1 = Take(st->open_point(p1.id));
  auto r2 = Take(st->open_point(p2.id));

  auto ch = Take(r2->changed_extents(*r1, 0, b.size()));
  CHECK(SameExtents(ch, ModelChanged(b, a)));
  auto back = Take(r1->changed_extents(*r2, 0, a.size()));
  CHECK(SameExtents(back, ModelChanged(a, b)));
  CHECK(back.size() == 9);  // 5, 9, 12, 150 dirty, merged clean runs between
  auto same = Take(r2->changed_extents(*r2, 0, b.size()));
  REQUIRE(same.size() == 1);
  CHECK(same[0].flags == 0);

  // A sub-range starts and ends mid-chunk; max_extents caps the answer.
  auto part = Take(r2->changed_extents(*r1, 4 * cs + 100, 2 * cs));
  REQUIRE(part.size() == 3);
  CHECK(part[0].length == cs - 100);
  CHECK(part[0].flags == 0);
  CHECK(part[1].length == cs);
  CHECK(part[1].flags == MetaContext::kDirty);
  CHECK(part[2].length == 100);
  CHECK(part[2].flags == 0);
  CHECK(Take(r2->changed_extents(*r1, 0, b.size(), 1)).size() == 1);
  CHECK(!r2->changed_extents(*r1, 0, b.size() + 1).ok());

  // Different chunk sizes cannot be compared by digest.
  Image c(64 * 8192, 8192);
  auto p3 = Commit(*st, 0, c, AllSlots(c));
  auto r3 = Take(st->open_point(p3.id));
  CHECK(r3->changed_extents(*r1, 0, c.size()).status().code() == Code::kInvalidArgument);
}

TEST_CASE("store: a disk grown between points keeps its data and reads zeroes beyond") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  constexpr uint32_t cs = 4096;  // small chunks: a deep tree without a huge image
  Image im(80 * cs + 1000, cs);  // depth 1, partial tail with data
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, s + 55);
  auto p1 = Commit(*st, 0, im, AllSlots(im));
  CHECK(p1.depth == 1);

  const uint64_t old_size = im.size();
  im.grow(uint64_t(20000) * cs);  // 20000 slots: depth 3
  im.random_slot(19990, 4242);
  im.random_slot(81, 4343);  // just past the old tail
  auto p2 = Commit(*st, p1.id, im, {19990, 81});
  CHECK(p2.depth == 3);
  CHECK(p2.size == im.size());
  CHECK(p2.new_pages == 2 + 2 + 1);  // leaves 0 and 156, level 2 pages 0 and 1, the root
  CheckRead(*st, p2.id, im);
  auto r = Take(st->open_point(p2.id));
  // The old partial chunk reads as before up to the old end, zeroes after.
  std::vector<char> tail(cs);
  REQUIRE_OK(V(r->read(80 * cs, cs, tail.data())));
  CHECK(std::memcmp(tail.data(), im.bytes.data() + 80 * cs, cs) == 0);
  CHECK(IsAllZero(tail.data() + (old_size - 80 * cs), cs - (old_size - 80 * cs)));
  auto ex = Take(r->extents(0, im.size()));
  CHECK(SameExtents(ex, ModelExtents(im)));

  // Growing without changing anything still yields a valid, bigger tree.
  PointParams big;
  big.parent = p2.id;
  big.size = uint64_t(128 * 128 * 128 + 5) * cs;  // depth 4; the model image stays small
  big.chunk_size = cs;
  auto p3 = Take(Take(st->begin_point(big))->commit());
  CHECK(p3.depth == 4);
  CHECK(p3.size == big.size);
  CHECK(p3.new_pages == 1);  // a new root above the old one
  auto r3 = Take(st->open_point(p3.id));
  CHECK(Take(r3->node(3, 0)) == p2.root);
  std::vector<char> got(2 * 20000 * cs);
  REQUIRE_OK(V(r3->read(0, got.size(), got.data())));
  CHECK(std::memcmp(got.data(), im.bytes.data(), im.size()) == 0);
  CHECK(IsAllZero(got.data() + im.size(), got.size() - im.size()));
  CHECK(Take(st->verify(p3.id)).ok());

  // Shrinking is refused; so is another chunk size.
  PointParams bad;
  bad.parent = p3.id;
  bad.size = old_size;
  bad.chunk_size = cs;
  CHECK(st->begin_point(bad).status().code() == Code::kInvalidArgument);
  bad.size = big.size;
  bad.chunk_size = 2 * cs;
  CHECK(st->begin_point(bad).status().code() == Code::kInvalidArgument);
}

TEST_CASE("store: deleting the first point leaves the second intact, before and after GC") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im1(300 * kCs);
  for (uint64_t s = 0; s < im1.slots(); ++s) im1.random_slot(s, s + 1000);
  auto p1 = Commit(*st, 0, im1, AllSlots(im1));
  Image im2 = im1;
  std::vector<uint64_t> changed;
  for (uint64_t s = 0; s < im2.slots(); s += 3) {
    im2.random_slot(s, s + 5000);
    changed.push_back(s);
  }
  auto p2 = Commit(*st, p1.id, im2, changed);
  Image im3 = im2;
  for (uint64_t s : {1, 11, 21}) im3.random_slot(s, s + 9000);
  auto p3 = Commit(*st, p2.id, im3, {1, 11, 21});

  REQUIRE_OK(V(st->delete_point(p1.id)));
  CHECK(st->point(p1.id).status().code() == Code::kNotFound);
  CHECK(st->delete_point(p1.id).code() == Code::kNotFound);
  CHECK(st->open_point(p1.id).status().code() == Code::kNotFound);
  CheckRead(*st, p2.id, im2);
  auto gc = Take(st->collect_garbage());
  // p1's 100 chunks that p2 overwrote, p1's 3 leaf pages and its root (p2 touched every leaf).
  CHECK(gc.objects_deleted == 104);
  CheckRead(*st, p2.id, im2);
  CheckRead(*st, p3.id, im3);
  CHECK(Take(st->verify(p2.id)).ok());

  // Delete the middle one too: the last still stands alone.
  REQUIRE_OK(V(st->delete_point(p2.id)));
  Take(st->collect_garbage());
  CHECK(Take(st->verify(p3.id)).ok());
  CheckRead(*st, p3.id, im3);
}

TEST_CASE("store: GC frees exactly the unreferenced chunks and rewrites mostly-dead packs") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  // Two disks, 8 MiB of unique data each.
  Image a(128 * kCs), b(128 * kCs);
  for (uint64_t s = 0; s < a.slots(); ++s) {
    a.random_slot(s, 1'000'000 + s);
    b.random_slot(s, 2'000'000 + s);
  }
  auto pa = Commit(*st, 0, a, AllSlots(a));
  auto pb = Commit(*st, 0, b, AllSlots(b));
  uint64_t before = PackBytesOnDisk(tmp.region());
  CHECK(before >= 16 * (1u << 20));

  // Nothing is garbage yet.
  auto g0 = Take(st->collect_garbage());
  CHECK(g0.objects_deleted == 0);
  CHECK(PackBytesOnDisk(tmp.region()) == before);

  REQUIRE_OK(V(st->delete_point(pa.id)));
  auto g1 = Take(st->collect_garbage());
  CHECK(g1.objects_deleted == 128 + 1);  // a's chunks and its one page
  uint64_t after = PackBytesOnDisk(tmp.region());
  uint64_t freed = before - after;
  INFO("before " << before << " after " << after);
  // All of a's 8 MiB goes (packs of a alone are dropped or rewritten), b's stays.
  CHECK(freed >= 8 * (1u << 20));
  CHECK(after >= 8 * (1u << 20));
  CHECK(after < 8 * (1u << 20) + 512 * 1024);  // pack headers/trailers only
  CheckRead(*st, pb.id, b);
  CHECK(Take(st->verify(pb.id)).ok());

  // Mixed packs: an incremental point that overwrote 3/4 of its parent, then
  // the parent deleted. Packs holding mostly dead chunks get rewritten.
  Image c = b;
  std::vector<uint64_t> changed;
  for (uint64_t s = 0; s < c.slots(); ++s) {
    if (s % 4 != 0) {
      c.random_slot(s, 3'000'000 + s);
      changed.push_back(s);
    }
  }
  auto pc = Commit(*st, pb.id, c, changed);
  REQUIRE_OK(V(st->delete_point(pb.id)));
  uint64_t before2 = PackBytesOnDisk(tmp.region());
  auto g2 = Take(st->collect_garbage());
  CHECK(g2.packs_repacked + g2.packs_deleted > 0);
  uint64_t after2 = PackBytesOnDisk(tmp.region());
  INFO("before2 " << before2 << " after2 " << after2);
  CHECK(before2 - after2 >= 5 * (1u << 20));  // at least most of b's 6 MiB of dead chunks
  CHECK(after2 < 8 * (1u << 20) + 1024 * 1024);
  CheckRead(*st, pc.id, c);
  CHECK(Take(st->verify(pc.id)).ok());

  // Delete everything: the region empties.
  REQUIRE_OK(V(st->delete_point(pc.id)));
  Take(st->collect_garbage());
  CHECK(PackBytesOnDisk(tmp.region()) == 0);
  CHECK(Take(st->stats()).objects == 0);
}

TEST_CASE("store: GC concurrent with writers keeps everything they reference") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  // Garbage the writer will reuse: a deleted point's chunks are still indexed
  // until a GC, so a writer deduplicating against them races with that GC.
  Image old(200 * kCs);
  for (uint64_t s = 0; s < old.slots(); ++s) old.random_slot(s, 77'000 + s);
  auto po = Commit(*st, 0, old, AllSlots(old));
  Image base(200 * kCs);
  for (uint64_t s = 0; s < base.slots(); ++s) base.random_slot(s, 88'000 + s);
  auto pbase = Commit(*st, 0, base, AllSlots(base));
  REQUIRE_OK(V(st->delete_point(po.id)));

  // Writer 1 (incremental over pbase) puts the old content (dedup hits on
  // garbage) and new content, with GCs running in between and concurrently.
  Image im = base;
  PointParams p;
  p.parent = pbase.id;
  p.size = im.size();
  p.chunk_size = kCs;
  auto w = Take(st->begin_point(p));
  for (uint64_t s = 0; s < 50; ++s) {
    std::memcpy(im.slot(s), old.slot(s), kCs);
    REQUIRE_OK(V(w->put(s, im.slot(s), kCs)));
  }
  Take(st->collect_garbage());  // between puts: must keep slots 0..49's chunks

  // The parent may be deleted while its child is being written.
  REQUIRE_OK(V(st->delete_point(pbase.id)));

  std::atomic<bool> stop{false};
  std::atomic<int> gcs{0};
  std::atomic<uint64_t> repacks{0};
  std::thread gc_thread([&] {
    while (!stop.load()) {
      auto r = st->collect_garbage();
      CHECK_MESSAGE(r.ok(), r.status().ToString());
      if (r.ok()) repacks.fetch_add(r.value().packs_repacked);
      gcs.fetch_add(1);
    }
  });
  // Two put threads, dedup hits on garbage and new chunks mixed.
  auto put_range = [&](uint64_t from, uint64_t to) {
    for (uint64_t s = from; s < to; ++s) {
      if (s % 2 == 0) {
        std::memcpy(im.slot(s), old.slot(s), kCs);
      } else {
        im.random_slot(s, 99'000 + s);
      }
      Status ps = w->put(s, im.slot(s), kCs);
      CHECK_MESSAGE(ps.ok(), ps.ToString());
      if (s % 16 == 0) std::this_thread::sleep_for(1ms);
    }
  };
  // Writers 2 and 3 meanwhile: chains of small incremental points, each
  // deleting its parent once committed. Every commit races a GC snapshot
  // (the point record appears and the writer's refs and parent pin go), each
  // point inherits a whole leaf page from its parent, every deleted parent
  // leaves half-dead packs for the GC to rewrite, and slots going back to the
  // content of three points ago deduplicate against garbage.
  struct Chain {
    Image im{200 * kCs};
    PointId last = 0;
  };
  constexpr int kRounds = 12;
  auto churn = [&](Chain* c, uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (int round = 0; round < kRounds; ++round) {
      PointParams cp;
      cp.parent = c->last;
      cp.size = c->im.size();
      cp.chunk_size = kCs;
      auto cw = st->begin_point(cp);
      CHECK_MESSAGE(cw.ok(), cw.status().ToString());
      if (!cw.ok()) return;
      std::vector<uint64_t> slots;
      if (round == 0) {
        slots = AllSlots(c->im);
      } else {
        const uint64_t leaf = uint64_t(round % 2);  // the other leaf is inherited
        for (int k = 0; k < 12; ++k) slots.push_back(leaf * 128 + rng() % 64);
      }
      for (uint64_t s : slots) {
        c->im.random_slot(s, seed * 1'000'000 + s * 10 + uint64_t(round % 3));
        Status ps = cw.value()->put(s, c->im.slot(s), kCs);
        CHECK_MESSAGE(ps.ok(), ps.ToString());
      }
      auto pc = cw.value()->commit();
      CHECK_MESSAGE(pc.ok(), pc.status().ToString());
      if (!pc.ok()) return;
      if (c->last != 0) CHECK(st->delete_point(c->last).ok());
      c->last = pc.value().id;
    }
  };
  Chain chains[2];
  std::thread c1(churn, &chains[0], 1);
  std::thread c2(churn, &chains[1], 2);
  std::thread t1(put_range, 50, 125);
  std::thread t2(put_range, 125, 200);
  t1.join();
  t2.join();
  while (gcs.load() < 3) std::this_thread::sleep_for(1ms);
  auto pw = Take(w->commit());
  c1.join();
  c2.join();
  stop.store(true);
  gc_thread.join();
  repacks.fetch_add(Take(st->collect_garbage()).packs_repacked);
  MESSAGE("GCs during the writes: ", gcs.load(), ", packs rewritten: ", repacks.load());
  CHECK(repacks.load() > 0);  // the race with pack rewriting was exercised

  CHECK(Take(st->verify(pw.id)).ok());
  CheckRead(*st, pw.id, im);
  for (Chain& c : chains) {
    REQUIRE(c.last != 0);
    CHECK(Take(st->verify(c.last)).ok());
    CheckRead(*st, c.last, c.im);
    REQUIRE_OK(V(st->delete_point(c.last)));
  }

  // A reader keeps a deleted point alive until it lets go.
  auto r = Take(st->open_point(pw.id));
  REQUIRE_OK(V(st->delete_point(pw.id)));
  Take(st->collect_garbage());
  std::vector<char> got(im.size());
  REQUIRE_OK(V(r->read(0, got.size(), got.data())));
  CHECK(std::memcmp(got.data(), im.bytes.data(), got.size()) == 0);
  r.reset();
  Take(st->collect_garbage());
  CHECK(Take(st->stats()).objects == 0);
}

TEST_CASE("store: a writer reusing garbage while GC sweeps keeps it (late references)") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image old(64 * kCs);
  for (uint64_t s = 0; s < old.slots(); ++s) old.random_slot(s, 11'000 + s);
  auto po = Commit(*st, 0, old, AllSlots(old));
  REQUIRE_OK(V(st->delete_point(po.id)));

  // After the GC has decided old's chunks are garbage, but before it deletes
  // them, one writer already running and one starting now both reuse them.
  PointParams p;
  p.size = old.size();
  p.chunk_size = kCs;
  auto early = Take(st->begin_point(p));
  std::unique_ptr<PointWriter> late;
  GcOptions o;
  o.before_sweep = [&] {
    for (uint64_t s = 0; s < 32; ++s) REQUIRE_OK(V(early->put(s, old.slot(s), kCs)));
    late = Take(st->begin_point(p));
    for (uint64_t s = 32; s < 64; ++s) REQUIRE_OK(V(late->put(s, old.slot(s), kCs)));
  };
  auto g = Take(st->collect_garbage(o));
  CHECK(g.objects_kept_late == 64);
  CHECK(g.objects_deleted == 1);  // only old's page
  auto pe = Take(early->commit());
  auto pl = Take(late->commit());
  CHECK(pe.new_chunks == 0);  // they really did reuse the garbage
  CHECK(pl.new_chunks == 0);
  Image e(old.size()), l(old.size());
  std::memcpy(e.bytes.data(), old.bytes.data(), 32 * kCs);
  std::memcpy(l.bytes.data() + 32 * kCs, old.bytes.data() + 32 * kCs, 32 * kCs);
  CHECK(Take(st->verify(pe.id)).ok());
  CHECK(Take(st->verify(pl.id)).ok());
  CheckRead(*st, pe.id, e);
  CheckRead(*st, pl.id, l);
  // And once nothing references them, they go.
  REQUIRE_OK(V(st->delete_point(pe.id)));
  REQUIRE_OK(V(st->delete_point(pl.id)));
  CHECK(Take(st->collect_garbage()).objects_deleted == 64 + 2);
  CHECK(PackBytesOnDisk(tmp.region()) == 0);
}

TEST_CASE("store: verify finds a corrupted byte in a chunk and in a page") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(300 * kCs);  // depth 2: 3 leaves + root
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, s % 150 + 31);  // each chunk twice
  auto p = Commit(*st, 0, im, AllSlots(im));
  CHECK(Take(st->verify(p.id)).ok());

  PackEntry bad = CorruptOne(tmp.region(), ObjectKind::kChunk);
  auto rep = Take(st->verify(p.id));
  REQUIRE(rep.damage.size() == 1);
  const Damage& d = rep.damage[0];
  CHECK(d.kind == Damage::Kind::kChunk);
  CHECK(d.digest == bad.digest);
  CHECK(d.reason == "checksum mismatch");
  CHECK(d.slot_count == 2);  // the chunk appears at two slots
  REQUIRE(d.slots.size() == 2);
  CHECK(d.slots[1] == d.slots[0] + 150);
  auto r = Take(st->open_point(p.id));
  CHECK(Take(r->slot_digest(d.slots[0])) == bad.digest);
  REQUIRE(rep.damaged_packs.size() == 1);
  CHECK(rep.damaged_packs[0] == d.pack);
  r.reset();

  // Quarantine, then a new point with the same data heals the old one.
  auto rq = Take(st->verify(p.id, VerifyOptions{true}));
  CHECK(!rq.ok());
  auto after_q = Take(st->verify(p.id));
  REQUIRE(after_q.damage.size() == 1);
  CHECK(after_q.damage[0].reason == "not in the chunk index");
  auto heal = Commit(*st, 0, im, {d.slots[0]});
  CHECK(heal.new_chunks == 1);
  CHECK(Take(st->verify(p.id)).ok());
  CheckRead(*st, p.id, im);

  // A byte of a pack's trailer: the objects are fine, the pack's framing is not.
  {
    auto rp = Take(st->verify(p.id));
    REQUIRE(rp.ok());
    CHECK(rp.packs_checked > 0);
    std::string victim = PackFiles(tmp.region()).front();
    UniqueFd fd(::open(victim.c_str(), O_RDWR));
    REQUIRE(fd.valid());
    off_t at = off_t(std::filesystem::file_size(victim) - sizeof(PackFooter) - 10);
    char c;
    REQUIRE(::pread(fd.get(), &c, 1, at) == 1);
    c ^= 1;
    REQUIRE(::pwrite(fd.get(), &c, 1, at) == 1);
    auto rt = Take(st->verify(p.id));
    CHECK(rt.damage.empty());
    REQUIRE(rt.pack_problems.size() == 1);
    CHECK(rt.pack_problems[0].reason.find("trailer checksum") != std::string::npos);
    CHECK(!rt.ok());
    c ^= 1;
    REQUIRE(::pwrite(fd.get(), &c, 1, at) == 1);
  }

  // A damaged leaf page: verify names it and the slots it maps; reads fail.
  Image im2(300 * kCs);
  for (uint64_t s = 0; s < im2.slots(); ++s) im2.random_slot(s, 600'000 + s);
  auto p2 = Commit(*st, 0, im2, AllSlots(im2));
  auto r2 = Take(st->open_point(p2.id));
  Digest leaf1 = Take(r2->node(1, 1));
  r2.reset();
  st.reset();  // drop cached pages: the next reads come from disk
  CorruptOne(tmp.region(), ObjectKind::kPage, &leaf1);
  st = Open(tmp.region());
  auto rep2 = Take(st->verify(p2.id));
  REQUIRE(rep2.damage.size() == 1);
  CHECK(rep2.damage[0].kind == Damage::Kind::kPage);
  CHECK(rep2.damage[0].digest == leaf1);
  CHECK(rep2.damage[0].level == 1);
  CHECK(rep2.damage[0].first_slot == 128);
  CHECK(rep2.damage[0].slot_count == 128);
  CHECK(rep2.chunks_checked == 300 - 128);
  auto r3 = Take(st->open_point(p2.id));
  std::vector<char> buf(kCs);
  CHECK(r3->read(130 * kCs, kCs, buf.data()).code() == Code::kIoError);
  REQUIRE_OK(V(r3->read(0, kCs, buf.data())));  // other leaves still read
}

// The slot of `im` whose chunk has digest d.
uint64_t SlotOf(Store& st, PointId id, const Digest& d) {
  auto r = Take(st.open_point(id));
  for (uint64_t s = 0; s < r->slots(); ++s) {
    if (Take(r->slot_digest(s)) == d) return s;
  }
  FAIL("digest not in the point");
  return 0;
}

TEST_CASE("store: a damaged chunk fails reads with an I/O error, is quarantined, then healed") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(300 * kCs + 5000);  // a partial last chunk too
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 7'000'000 + s);
  auto p = Commit(*st, 0, im, AllSlots(im));
  PackEntry bad = CorruptOne(tmp.region(), ObjectKind::kChunk);
  const uint64_t slot = SlotOf(*st, p.id, bad.digest);
  CHECK(Take(st->damaged_slots(p.id)).empty());

  {
    auto r = Take(st->open_point(p.id));
    std::vector<char> buf(3 * kCs);
    // The damaged chunk, whole or a few bytes of it: an error, never data.
    Status whole = r->read(slot * kCs, kCs, buf.data());
    CHECK(whole.code() == Code::kIoError);
    CHECK_MESSAGE(whole.message().find("disk bytes [" + std::to_string(slot * kCs) + ", ") !=
                      std::string::npos,
                  whole.message());
    CHECK(r->read(slot * kCs + 10, 100, buf.data()).code() == Code::kIoError);
    // Other ranges read fine, also the chunks right next to it.
    for (uint64_t s : {slot ? slot - 1 : slot + 2, slot + 1}) {
      REQUIRE_OK(V(r->read(s * kCs, kCs, buf.data())));
      CHECK(std::memcmp(buf.data(), im.slot(s), kCs) == 0);
    }
    // Quarantined: out of the index (dedup will not reuse it), and named as
    // the slot the next point of this disk must copy again.
    CHECK(Take(st->damaged_slots(p.id)) == std::vector<uint64_t>{slot});
    auto rep = Take(st->verify(p.id));
    REQUIRE(rep.damage.size() == 1);
    CHECK(rep.damage[0].reason == "not in the chunk index");
    // Consistent afterwards: still an I/O error (now "missing").
    CHECK(r->read(slot * kCs, kCs, buf.data()).code() == Code::kIoError);
  }

  // The next point puts the same content: a fresh copy, which heals p.
  auto p2 = Commit(*st, p.id, im, {slot});
  CHECK(p2.new_chunks == 1);
  CHECK(Take(st->damaged_slots(p.id)).empty());
  CHECK(Take(st->verify(p.id)).ok());
  CheckRead(*st, p.id, im);
  CheckRead(*st, p2.id, im);
}

TEST_CASE("store: direct reads (restore) read back exactly and fail a damaged chunk loudly") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(200 * kCs + 5000);  // a partial last chunk too
  for (uint64_t s = 0; s < im.slots(); ++s) {
    if (s % 9 != 4) im.random_slot(s, 9'000'000 + s);
  }
  auto p = Commit(*st, 0, im, AllSlots(im));
  constexpr auto kDirect = PointReader::ReadMode::kDirect;
  auto r = Take(st->open_point(p.id));
  // 4 KiB aligned, as the restore's buffers: whole chunks go O_DIRECT.
  std::unique_ptr<char, decltype(&std::free)> mem(
      static_cast<char*>(std::aligned_alloc(4096, (im.size() + 8191) / 4096 * 4096)), &std::free);
  REQUIRE(mem);
  REQUIRE_OK(V(r->read(0, im.size(), mem.get(), kDirect)));
  CHECK(std::memcmp(mem.get(), im.bytes.data(), im.size()) == 0);
  auto loc = Take(r->resolve(0, 1));
  REQUIRE(loc[0].pack);
  CHECK(loc[0].pack->direct_fd() >= 0);  // this filesystem takes O_DIRECT
  // Unaligned ranges and an unaligned buffer: partial chunks through the
  // page cache, the rest as it can; the same bytes either way.
  for (auto [off, len] : {std::pair<uint64_t, uint64_t>{kCs / 2, 3 * kCs},
                          {7 * kCs, 5 * kCs + 17},
                          {im.size() - kCs - 100, kCs + 100}}) {
    for (size_t shift : {size_t{0}, size_t{1}}) {
      REQUIRE_OK(V(r->read(off, len, mem.get() + shift, kDirect)));
      CHECK(std::memcmp(mem.get() + shift, im.bytes.data() + off, len) == 0);
    }
  }
  // A flipped bit in a chunk: the direct read re-hashes it and fails, never
  // returns the bad bytes.
  r.reset();
  PackEntry bad = CorruptOne(tmp.region(), ObjectKind::kChunk);
  const uint64_t slot = SlotOf(*st, p.id, bad.digest);
  r = Take(st->open_point(p.id));
  Status s = r->read(0, im.size(), mem.get(), kDirect);
  CHECK(s.code() == Code::kIoError);
  CHECK_MESSAGE(
      s.message().find("disk bytes [" + std::to_string(slot * kCs) + ", ") != std::string::npos,
      s.message());
}

TEST_CASE("store: GC with a damaged point still collects other points' garbage, keeps its data") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image old_im(100 * kCs), im(300 * kCs), later(100 * kCs);
  for (uint64_t s = 0; s < old_im.slots(); ++s) old_im.random_slot(s, 8'000'000 + s);
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 8'100'000 + s);
  for (uint64_t s = 0; s < later.slots(); ++s) later.random_slot(s, 8'200'000 + s);
  auto older = Commit(*st, 0, old_im, AllSlots(old_im));  // garbage as old as the damage
  std::this_thread::sleep_for(10ms);
  auto a = Commit(*st, 0, im, AllSlots(im));  // will be damaged
  Digest leaf1 = Take(Take(st->open_point(a.id))->node(1, 1));
  auto b = Commit(*st, 0, later, AllSlots(later));  // garbage newer than the damage
  REQUIRE_OK(V(st->delete_point(older.id)));
  REQUIRE_OK(V(st->delete_point(b.id)));
  st.reset();  // no cached pages: GC reads a's leaf from its pack
  CorruptOne(tmp.region(), ObjectKind::kPage, &leaf1);
  st = Open(tmp.region());

  auto gc = Take(st->collect_garbage());
  CHECK(gc.pages_unreadable == 1);
  // b's chunks and pages went; the older point's are kept, as anything in
  // a pack no newer than a might lie below a's unreadable leaf.
  CHECK(gc.objects_deleted >= 100 + 1);
  CHECK(gc.objects_kept_unknown >= 100);
  CHECK(!Take(st->point(a.id)).root.is_zero());
  // a's other leaves still read.
  {
    auto r = Take(st->open_point(a.id));
    std::vector<char> buf(kCs);
    CHECK(r->read(130 * kCs, kCs, buf.data()).code() == Code::kIoError);
    REQUIRE_OK(V(r->read(0, kCs, buf.data())));
    CHECK(std::memcmp(buf.data(), im.slot(0), kCs) == 0);
    // The leaf is known to be damaged: the disk's next point cannot tell
    // which blocks it lost (the caller takes a full point).
    CHECK(st->damaged_slots(a.id).status().code() == Code::kIoError);
  }
  // A full point of the same disk: every chunk below the damaged leaf was
  // kept (none is stored again), the leaf gets a fresh copy, a is whole again.
  auto heal = Commit(*st, 0, im, AllSlots(im));
  CHECK(heal.new_chunks == 0);
  CheckRead(*st, a.id, im);
  CHECK(Take(st->verify(a.id)).ok());
  // With nothing unreadable left, the older garbage goes too.
  auto gc2 = Take(st->collect_garbage());
  CHECK(gc2.pages_unreadable == 0);
  CHECK(gc2.objects_deleted >= 100);
  CheckRead(*st, a.id, im);
}

TEST_CASE("store: crash leftovers (abandoned writer, torn pack) leave earlier points intact") {
  TmpDir tmp;
  Image im(100 * kCs);
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 123 + s);
  PointId first;
  uint64_t clean_bytes;
  {
    auto st = Open(tmp.region());
    first = Commit(*st, 0, im, AllSlots(im)).id;
    clean_bytes = PackBytesOnDisk(tmp.region());
    // A writer abandoned mid-way: several packs sealed and indexed, one open.
    PointParams p;
    p.parent = first;
    p.size = im.size();
    p.chunk_size = kCs;
    auto w = Take(st->begin_point(p));
    std::vector<char> buf(kCs);
    for (uint64_t s = 0; s < 60; ++s) {
      Fill(buf.data(), kCs, 555'000 + s);
      REQUIRE_OK(V(w->put(s, buf.data(), kCs)));
    }
    CHECK(PackBytesOnDisk(tmp.region()) > clean_bytes);
    w.reset();  // abandoned: the open pack's temp file goes at once
    CHECK(Take(st->list_points()).size() == 1);
  }
  // A torn pack tail as a crash mid-seal leaves it: a sealed-looking pack file
  // the index never heard of, cut short; and a half-written .tmp file.
  auto files = PackFiles(tmp.region());
  REQUIRE(!files.empty());
  std::string torn = tmp.region() + "/packs/ff/00000000000fffff.pack";
  std::filesystem::create_directories(tmp.region() + "/packs/ff");
  std::filesystem::copy_file(files[0], torn);
  REQUIRE(::truncate(torn.c_str(), off_t(std::filesystem::file_size(torn) - 777)) == 0);
  std::string tmpfile = tmp.region() + "/packs/ff/00000000000ffffe.pack.tmp";
  std::filesystem::copy_file(files[0], tmpfile);
  {
    // Recovery removes the .tmp (never complete) but never a sealed-looking
    // pack: it cannot be indexed (torn), so it stays until an operator asks.
    auto st = Open(tmp.region());
    CHECK(std::filesystem::exists(torn));
    CHECK(!std::filesystem::exists(tmpfile));
    CHECK(Take(st->list_points()).size() == 1);
    CheckRead(*st, first, im);
    CHECK(Take(st->verify(first)).ok());
    // The abandoned writer's indexed chunks are garbage for the next GC.
    auto g = Take(st->collect_garbage());
    CHECK(g.objects_deleted > 0);  // the sealed packs' chunks (the open one died with it)
    CHECK(g.objects_deleted <= 60);
    auto orphans = Take(st->delete_unindexed_packs());
    CHECK(orphans.packs_deleted == 1);
    CHECK(!std::filesystem::exists(torn));
    CHECK(PackBytesOnDisk(tmp.region()) == clean_bytes);
    // New pack ids never collide with the removed files.
    Commit(*st, first, im, {1});
  }

  // A real process dying mid-write (no destructor runs at all).
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    auto r = Store::Open(Opts(tmp.region()));
    if (!r.ok()) ::_exit(2);
    auto st = std::move(r).value();
    PointParams p;
    p.parent = first;
    p.size = im.size();
    p.chunk_size = kCs;
    auto w = st->begin_point(p);
    if (!w.ok()) ::_exit(3);
    std::vector<char> buf(kCs);
    for (uint64_t s = 0; s < 40; ++s) {
      Fill(buf.data(), kCs, 666'000 + s);
      if (!w.value()->put(s, buf.data(), kCs).ok()) ::_exit(4);
    }
    ::_exit(0);  // mid-point: no commit, no cleanup
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  {
    auto st = Open(tmp.region());
    CHECK(Take(st->list_points()).size() == 2);
    CheckRead(*st, first, im);
    CHECK(Take(st->verify(first)).ok());
    for (const auto& f : PackFiles(tmp.region())) CHECK(f.find(".tmp") == std::string::npos);
    Take(st->collect_garbage());
    CHECK(Take(st->verify(first)).ok());
  }
}

namespace {
void CheckSameRecord(const PointInfo& a, const PointInfo& b) {
  CHECK(a.id == b.id);
  CHECK(a.root == b.root);
  CHECK(a.size == b.size);
  CHECK(a.chunk_size == b.chunk_size);
  CHECK(a.depth == b.depth);
  CHECK(a.parent == b.parent);
  CHECK(a.created_ns == b.created_ns);
  CHECK(a.tag == b.tag);
  CHECK(a.new_chunks == b.new_chunks);
  CHECK(a.put_slots == b.put_slots);
}
}  // namespace

TEST_CASE("store: a damaged store.db is Corruption and the error says how to rebuild it") {
  TmpDir tmp;
  Image a(60 * kCs);
  for (uint64_t s = 0; s < a.slots(); ++s) a.random_slot(s, 4200 + s);
  {
    auto st = Open(tmp.region());
    Commit(*st, 0, a, AllSlots(a), "disk-a/1");
  }
  const std::string db = tmp.region() + "/store.db";
  for (const char* f : {"-wal", "-shm"}) std::filesystem::remove(db + f);
  REQUIRE(std::filesystem::file_size(db) > 8192);
  {  // garbage over every page past the first (the schema)
    const auto size = std::filesystem::file_size(db);
    std::fstream f(db, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096);
    for (uint64_t i = 4096; i < size; ++i) f.put(static_cast<char>(i * 131 + 7));
  }
  auto r = Store::Open(Opts(tmp.region()));
  REQUIRE_FALSE(r.ok());
  CHECK_MESSAGE(r.status().code() == Code::kCorruption, r.status().ToString());
  CHECK_MESSAGE(r.status().message().find("move " + db) != std::string::npos,
                r.status().ToString());
  // As the hint says: moved aside, it is rebuilt and the point reads back.
  std::filesystem::rename(db, db + ".bad");
  auto st = Open(tmp.region());
  auto points = Take(st->list_points());
  REQUIRE(points.size() == 1);
  CheckRead(*st, points[0].id, a);
}

TEST_CASE("store: a lost or empty store.db is rebuilt from the packs; no pack is unlinked") {
  TmpDir tmp;
  Image a(90 * kCs), b(40 * kCs + 1234);
  for (uint64_t s = 0; s < a.slots(); ++s) a.random_slot(s, 7000 + s);
  for (uint64_t s = 0; s < b.slots(); ++s) b.random_slot(s, 8000 + s);
  Image a2 = a;
  for (uint64_t s : {3, 40, 41, 89}) a2.random_slot(s, 9000 + s);
  std::vector<PointInfo> before;
  PointId deleted;
  {
    auto st = Open(tmp.region());
    PointId pa = Commit(*st, 0, a, AllSlots(a), "disk-a/1").id;
    Commit(*st, 0, b, AllSlots(b), "disk b \n odd tag");
    Commit(*st, pa, a2, {3, 40, 41, 89}, "disk-a/2");
    Image gone(20 * kCs);
    for (uint64_t s = 0; s < gone.slots(); ++s) gone.random_slot(s, 99000 + s);
    deleted = Commit(*st, 0, gone, AllSlots(gone), "deleted").id;
    REQUIRE_OK(V(st->delete_point(deleted)));
    before = Take(st->list_points());
    REQUIRE(before.size() == 3);
  }
  const auto packs = PackFiles(tmp.region());
  REQUIRE(packs.size() >= 4);  // 1 MiB packs: the points span several
  const std::vector<Image*> images{&a, &b, &a2};

  for (int round = 0; round < 2; ++round) {
    INFO("round " << round << (round == 0 ? ": store.db deleted" : ": store.db empty"));
    for (const char* f : {"/store.db", "/store.db-wal", "/store.db-shm"}) {
      std::filesystem::remove(tmp.region() + f);
    }
    if (round == 1) std::ofstream(tmp.region() + "/store.db").flush();  // a fresh empty file
    auto st = Open(tmp.region());
    CHECK(PackFiles(tmp.region()) == packs);  // nothing unlinked
    auto after = Take(st->list_points());
    REQUIRE(after.size() == before.size());  // the deleted point stays deleted
    for (size_t i = 0; i < after.size(); ++i) {
      CheckSameRecord(after[i], before[i]);
      CheckRead(*st, after[i].id, *images[i]);
      CHECK(Take(st->verify(after[i].id)).ok());
    }
    auto stats = Take(st->stats());
    CHECK(stats.packs == packs.size());
  }
  // Point ids continue above every surviving one.
  auto st = Open(tmp.region());
  Image c(8 * kCs);
  for (uint64_t s = 0; s < c.slots(); ++s) c.random_slot(s, 123456 + s);
  PointInfo pc = Commit(*st, 0, c, AllSlots(c), "after");
  CHECK(pc.id > before.back().id);
  CHECK(pc.id >= deleted);  // the deleted point's id is free again only after a full rebuild
  // GC after a rebuild frees only what no point names.
  Take(st->collect_garbage());
  for (size_t i = 0; i < before.size(); ++i) CheckRead(*st, before[i].id, *images[i]);
  CheckRead(*st, pc.id, c);
}

TEST_CASE(
    "store: repair() imports what a live store's index lost; delete_unindexed_packs is explicit") {
  TmpDir tmp;
  Image a(30 * kCs);
  for (uint64_t s = 0; s < a.slots(); ++s) a.random_slot(s, 4242 + s);
  PointId pa;
  {
    auto st = Open(tmp.region());
    pa = Commit(*st, 0, a, AllSlots(a), "a").id;
  }
  // A second region directory holding only the packs and point files of the
  // first (a copy without store.db), opened and then repaired live.
  std::string copy = tmp.path() + "/copy";
  std::filesystem::create_directories(copy);
  std::filesystem::copy(tmp.region() + "/packs", copy + "/packs",
                        std::filesystem::copy_options::recursive);
  std::filesystem::copy(tmp.region() + "/points", copy + "/points",
                        std::filesystem::copy_options::recursive);
  auto st = Open(copy);
  REQUIRE(Take(st->list_points()).size() == 1);
  CheckRead(*st, pa, a);
  // Nothing left to do: repair changes nothing and deletes nothing.
  auto packs = PackFiles(copy);
  auto rep = Take(st->repair());
  CHECK(rep.packs_indexed == 0);
  CHECK(rep.points_imported == 0);
  CHECK(PackFiles(copy) == packs);
  auto orphans = Take(st->delete_unindexed_packs());
  CHECK(orphans.packs_deleted == 0);
  CHECK(PackFiles(copy) == packs);
  // While a writer is open, both refuse (Conflict) rather than race it.
  PointParams p;
  p.size = a.size();
  p.chunk_size = kCs;
  auto w = Take(st->begin_point(p));
  CHECK(st->repair().status().code() == Code::kConflict);
  CHECK(st->delete_unindexed_packs().status().code() == Code::kConflict);
  w.reset();
  CHECK(st->repair().ok());
}

TEST_CASE("store: one region, one process") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  CHECK(Store::Open(Opts(tmp.region())).status().code() == Code::kConflict);
}

TEST_CASE("store: put from several threads, leaves spilled to scratch, same result") {
  TmpDir tmp;
  StoreOptions o = Opts(tmp.region());
  o.writer_leaf_cache_bytes = 16 * kPageBytes;  // 16 resident leaves at most
  auto st = Take(Store::Open(o));
  Image im(uint64_t(6000) * 4096, 4096);  // 47 leaves
  std::vector<uint64_t> slots;
  for (uint64_t s = 0; s < im.slots(); s += 3) slots.push_back(s);
  std::mt19937_64 rng(7);
  std::shuffle(slots.begin(), slots.end(), rng);  // random order: forces spills and reloads
  for (uint64_t s : slots) im.random_slot(s, 31'000 + s);
  PointParams p;
  p.size = im.size();
  p.chunk_size = im.cs;
  auto w = Take(st->begin_point(p));
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < slots.size();) {
      Status s = w->put(slots[i], im.slot(slots[i]), im.cs);
      CHECK_MESSAGE(s.ok(), s.ToString());
    }
  };
  std::thread a(worker), b(worker), c(worker);
  a.join();
  b.join();
  c.join();
  auto pt = Take(w->commit());
  CHECK(pt.new_chunks == slots.size());
  CheckRead(*st, pt.id, im);

  // Same content written in order, single thread, default cache: same root.
  TmpDir tmp2;
  auto st2 = Open(tmp2.region());
  auto pt2 = Commit(*st2, 0, im, AllSlots(im));
  CHECK(pt2.root == pt.root);
}

namespace {
// A point of `im` written in put_many batches of 16 from two threads, as the
// copier does; the first error any call or commit() returned, or the point.
Result<PointInfo> WriteTwoThreads(Store& st, Image& im) {
  PointParams p;
  p.size = im.size();
  p.chunk_size = im.cs;
  auto wr = st.begin_point(p);
  if (!wr.ok()) return wr.status();
  auto w = std::move(wr).value();
  std::atomic<uint64_t> next{0};
  std::mutex mu;
  Status first_error;
  auto worker = [&] {
    std::vector<char> buf(16 * im.cs);
    for (;;) {
      uint64_t first = next.fetch_add(16);
      if (first >= im.slots()) return;
      uint64_t slots[16];
      size_t n = 0;
      for (uint64_t s = first; s < std::min<uint64_t>(first + 16, im.slots()); ++s, ++n) {
        slots[n] = s;
        std::memset(buf.data() + n * im.cs, 0, im.cs);
        std::memcpy(buf.data() + n * im.cs, im.slot(s), im.slot_len(s));
      }
      Status s = w->put_many(slots, n, buf.data());
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (first_error.ok()) first_error = s;
        return;
      }
    }
  };
  std::thread a(worker), b(worker);
  a.join();
  b.join();
  if (!first_error.ok()) {
    w->abandon();
    return first_error;
  }
  return w->commit();
}
}  // namespace

TEST_CASE("store: put_many batches (duplicates, zeroes, partial tail) equal put, many packs") {
  TmpDir tmp;
  auto st = Open(tmp.region());                  // 1 MiB packs: the sealer thread seals dozens
  Image im(uint64_t(3000) * 4096 + 1000, 4096);  // a partial last slot
  for (uint64_t s = 0; s < im.slots(); ++s) {
    if (s % 7 == 3) continue;                         // zero: a hole
    im.random_slot(s, s % 11 == 5 ? 5 : 77'000 + s);  // s % 11 == 5: one content, many slots
  }
  // Batches of 16 slots from two threads, as the copier hands them over.
  auto pt = Take(WriteTwoThreads(*st, im));
  CheckRead(*st, pt.id, im);
  CHECK(Take(st->verify(pt.id)).ok());
  // Same bytes through put(), one slot at a time: the same tree, and the
  // second point stores nothing new (every chunk deduplicated).
  TmpDir tmp2;
  auto st2 = Open(tmp2.region());
  auto pt2 = Commit(*st2, 0, im, AllSlots(im));
  CHECK(pt2.root == pt.root);
  CHECK(pt2.new_chunks == pt.new_chunks);
  auto again = Commit(*st, 0, im, AllSlots(im));
  CHECK(again.root == pt.root);
  CHECK(again.new_chunks == 0);
  // The region reopens with the point (every pack the sealer wrote indexed).
  st.reset();
  st = Open(tmp.region());
  CheckRead(*st, pt.id, im);
}

namespace {
// Pages of [off, off + len) of `path` in the page cache (mincore).
size_t ResidentPages(const std::string& path, uint64_t off, uint64_t len) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd);
  const size_t pg = size_t(::sysconf(_SC_PAGESIZE));
  void* m = ::mmap(nullptr, off + len, PROT_READ, MAP_SHARED, fd.get(), 0);
  REQUIRE(m != MAP_FAILED);
  std::vector<unsigned char> vec((off + len + pg - 1) / pg);
  REQUIRE(::mincore(m, off + len, vec.data()) == 0);
  ::munmap(m, off + len);
  size_t n = 0;
  for (size_t i = off / pg; i < vec.size(); ++i) n += vec[i] & 1;
  return n;
}

// Arms fault rules for one scope (the unit tests run without RPOINTD_FAULTS).
struct ScopedFaults {
  explicit ScopedFaults(const std::string& rules) {
    auto r = fault::ParseRules(rules);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    fault::Arm(std::move(r).value());
  }
  ~ScopedFaults() { fault::DisarmAll(); }
};

}  // namespace

TEST_CASE("store: pack buffers are written behind, with O_DIRECT where the filesystem takes it") {
  TmpDir tmp;
  std::string packs = tmp.path() + "/packs";
  // Two 1 MiB buffers for 6 MiB of objects: appends go on while the flusher
  // writes, and wait for a buffer only when both are out.
  auto pool = std::make_shared<BufferPool>(1 << 20, 2);
  auto w = Take(PackWriter::Create(packs, 7, 1 << 20, pool, /*direct=*/true));
  std::vector<char> obj(kCs);
  std::vector<std::pair<Digest, uint64_t>> put;
  for (int i = 0; i < 96; ++i) {
    Fill(obj.data(), kCs, 9000 + i);
    Digest d = Sha256(obj.data(), kCs);
    put.emplace_back(d, Take(w->append(ObjectKind::kChunk, d, obj.data(), kCs, kCs)));
  }
  const bool direct = w->direct();
  auto sealed = Take(w->seal());
  CHECK(sealed.entries.size() == 96);
  std::string path = PackPath(packs, 7);
  if (direct) {
    // Nothing of the objects went through the page cache (checked before any
    // read of the file, whose readahead would bring pages in).
    CHECK(ResidentPages(path, kPackHeaderBytes, 96 * kCs) == 0);
  } else {
    MESSAGE("O_DIRECT refused by this filesystem: buffered pack writes only");
  }
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd);
  auto entries = Take(ReadPackTrailer(fd.get(), 7));
  REQUIRE(entries.size() == 96);
  for (size_t i = 0; i < put.size(); ++i) {
    CHECK(entries[i].digest == put[i].first);
    CHECK(entries[i].offset == put[i].second);
    REQUIRE(::pread(fd.get(), obj.data(), kCs, off_t(put[i].second)) == ssize_t(kCs));
    CHECK(Sha256(obj.data(), kCs) == put[i].first);
  }

  // The same point with and without O_DIRECT, objects of odd sizes included
  // (a partial last chunk): the same tree, and both read back exactly.
  Image im(uint64_t(300) * kCs + 5000);
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 4400 + s);
  TmpDir a, b;
  auto oa = Opts(a.region());
  auto ob = Opts(b.region());
  ob.pack_direct_io = false;
  auto sa = Take(Store::Open(oa));
  auto sb = Take(Store::Open(ob));
  auto pa = Take(WriteTwoThreads(*sa, im));
  auto pb = Take(WriteTwoThreads(*sb, im));
  CHECK(pa.root == pb.root);
  CheckRead(*sa, pa.id, im);
  CheckRead(*sb, pb.id, im);
  CHECK(Take(sa->verify(pa.id)).ok());
  sa.reset();
  sa = Take(Store::Open(oa));
  CheckRead(*sa, pa.id, im);
}

// A point of `im` written into a fresh region with fault `rules` armed that
// only divert I/O (to the page cache): it succeeds and reads back exactly.
void WriteUnderFaultsReadsBack(Image& im, const char* rules) {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Result<PointInfo> r = Status::Internal("not run");
  {
    ScopedFaults f(rules);
    r = WriteTwoThreads(*st, im);
  }
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  CheckRead(*st, r->id, im);
  CHECK(Take(st->verify(r->id)).ok());
}

TEST_CASE("store: packs on tmpfs, and direct writes refused (EINVAL), go through the page cache") {
  Image im(uint64_t(200) * kCs + 5000);
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 7100 + s);
  // A region on tmpfs (its O_DIRECT is the page cache, or refused on older
  // kernels): the point is exact and survives a reopen.
  if (!std::filesystem::is_directory("/dev/shm")) {
    if (std::getenv("CI")) FAIL("no /dev/shm for the tmpfs case");
  } else {
    TmpDir shm("/dev/shm");
    auto st = Open(shm.region());
    auto p = Take(WriteTwoThreads(*st, im));
    CheckRead(*st, p.id, im);
    CHECK(Take(st->verify(p.id)).ok());
    st.reset();
    st = Open(shm.region());
    CheckRead(*st, p.id, im);
  }
  // The first direct buffer write refused with EINVAL (what a filesystem
  // without O_DIRECT support says at write time): that buffer goes through
  // the page cache, the rest direct; the point is exact.
  WriteUnderFaultsReadsBack(im, "pack.write=22*1");
}

TEST_CASE(
    "store: pack.open reaches every pack open: a new pack fails a point, a sealed one a read") {
  Image base(64 * kCs);
  for (uint64_t s = 0; s < base.slots(); ++s) base.random_slot(s, 300 + s);
  Image im(64 * kCs);
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 900 + s);
  TmpDir tmp;
  auto st = Open(tmp.region());
  PointId first = Commit(*st, 0, base, AllSlots(base)).id;
  {
    ScopedFaults f("pack.open=EIO");
    Result<PointInfo> r = WriteTwoThreads(*st, im);
    REQUIRE(!r.ok());
    CHECK_MESSAGE(r.status().message().find("create ") != std::string::npos, r.status().ToString());
    CHECK_MESSAGE(r.status().message().find(".pack.tmp") != std::string::npos,
                  r.status().ToString());
    CHECK(fault::Hits("pack.open") >= 1);
  }
  CHECK(Take(st->list_points()).size() == 1);
  CheckRead(*st, first, base);

  // Reopened, no pack is open: reading the point opens its packs.
  st.reset();
  st = Open(tmp.region());
  {
    ScopedFaults f("pack.open=EIO");
    auto r = Take(st->open_point(first));
    std::vector<char> got(kCs);
    Status s = r->read(0, got.size(), got.data());
    CHECK(s.code() == Code::kIoError);
    CHECK_MESSAGE(s.message().find("open pack ") != std::string::npos, s.ToString());
  }
  CheckRead(*st, first, base);  // disarmed: exact again
  CHECK(Take(st->verify(first)).ok());
}

TEST_CASE("store: a failed pack write or fdatasync in the pipeline fails the point, nothing lost") {
  Image base(64 * kCs);
  for (uint64_t s = 0; s < base.slots(); ++s) base.random_slot(s, 100 + s);
  Image im(400 * kCs);  // 25 MiB: many 256 KiB buffers and 1 MiB packs
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 5000 + s);
  struct Case {
    const char* rules;
    const char* want;  // in the error
  };
  // A buffer write in the flusher (the 3rd write: mid-pack, while appends go
  // on), a later one, the fdatasync of a pack the sealer thread seals, and of
  // the last pack commit() seals.
  for (const Case& c :
       {Case{"pack.write=EIO@3", "write"}, Case{"pack.write=ENOSPC@28", "write"},
        Case{"pack.sync=EIO@3", "fdatasync"}, Case{"pack.sync=EIO@26", "fdatasync"}}) {
    CAPTURE(c.rules);
    TmpDir tmp;
    PointId first;
    {
      auto st = Open(tmp.region());
      first = Commit(*st, 0, base, AllSlots(base)).id;
      Result<PointInfo> r = Status::Internal("not run");
      {
        ScopedFaults f(c.rules);
        r = WriteTwoThreads(*st, im);
      }
      REQUIRE(!r.ok());
      CHECK_MESSAGE(r.status().message().find(c.want) != std::string::npos, r.status().ToString());
      CHECK(Take(st->list_points()).size() == 1);
      CheckRead(*st, first, base);
    }
    // Reopened: still only the first point, intact; no temp pack left.
    auto st = Open(tmp.region());
    auto pts = Take(st->list_points());
    REQUIRE(pts.size() == 1);
    CHECK(pts[0].id == first);
    CheckRead(*st, first, base);
    CHECK(Take(st->verify(first)).ok());
    for (const auto& f : PackFiles(tmp.region())) CHECK(f.find(".tmp") == std::string::npos);
    // And the next point of the same data succeeds.
    auto pt = Take(WriteTwoThreads(*st, im));
    CheckRead(*st, pt.id, im);
  }
  // Short writes (the rest of a direct write goes through the page cache):
  // the point succeeds and reads back exactly.
  WriteUnderFaultsReadsBack(im, "pack.write=short");
}

TEST_CASE("store: 1 TiB sparse disk, small change: cost follows the change") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  const uint64_t size = uint64_t(1) << 40;
  PointParams p;
  p.size = size;
  p.chunk_size = kCs;
  auto w = Take(st->begin_point(p));
  std::vector<char> buf(kCs);
  // A base with 64 scattered chunks.
  const uint64_t slots = size / kCs;
  for (uint64_t i = 0; i < 64; ++i) {
    Fill(buf.data(), kCs, i);
    REQUIRE_OK(V(w->put(i * (slots / 64), buf.data(), kCs)));
  }
  auto base = Take(w->commit());
  CHECK(base.depth == 4);
  CHECK(base.new_pages <= 64 + 64 + 64 + 1);

  auto t0 = std::chrono::steady_clock::now();
  p.parent = base.id;
  auto w2 = Take(st->begin_point(p));
  std::vector<uint64_t> changed;
  for (uint64_t i = 0; i < 256; ++i) changed.push_back((i * 2654435761ull) % slots);
  std::sort(changed.begin(), changed.end());
  changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
  for (uint64_t s : changed) {
    Fill(buf.data(), kCs, 1'000'000 + s);
    REQUIRE_OK(V(w2->put(s, buf.data(), kCs)));
  }
  auto inc = Take(w2->commit());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(inc.new_chunks == changed.size());
  CHECK(inc.new_pages <= changed.size() * 4);  // at most depth pages per changed slot
  CHECK(secs < 10.0);
  auto r = Take(st->open_point(inc.id));
  auto ex = Take(r->extents(0, size));
  CHECK(ex.size() <= 2 * (256 + 64) + 1);
  uint64_t data = 0, total = 0;
  for (const Extent& e : ex) {
    total += e.length;
    if (!(e.flags & Extent::kHole)) data += e.length;
  }
  CHECK(total == size);
  CHECK(data <= (256 + 64) * uint64_t(kCs));
  for (uint64_t s : {changed[0], changed[100]}) {
    std::vector<char> want(kCs), got(kCs);
    Fill(want.data(), kCs, 1'000'000 + s);
    REQUIRE_OK(V(r->read(s * kCs, kCs, got.data())));
    CHECK(got == want);
  }
  CHECK(Take(st->verify(inc.id)).ok());
}

// ---- the BlockDevice view through a real Reactor ---------------------------

namespace {

class Loop {
 public:
  Loop() {
    reactor_ = Take(Reactor::Create("store-test", 64));
    thread_ = std::thread([this] { reactor_->run(); });
  }
  ~Loop() {
    reactor_->stop();
    thread_.join();
  }
  Reactor& reactor() { return *reactor_; }

 private:
  std::unique_ptr<Reactor> reactor_;
  std::thread thread_;
};

thread_local bool t_in_submit = false;

class Io final : public IoRequest {
 public:
  Io(IoKind k, uint64_t off, uint64_t len, char* b) {
    kind = k;
    offset = off;
    length = len;
    buf = b;
  }
  void on_done(int r) override {
    inside_submit = t_in_submit;
    promise_.set_value(r);
  }
  int wait() {
    auto f = promise_.get_future();
    REQUIRE(f.wait_for(20s) == std::future_status::ready);
    return f.get();
  }
  bool inside_submit = false;

 private:
  std::promise<int> promise_;
};

void Submit(Loop& loop, BlockDevice& dev, Io& io) {
  loop.reactor().post([&] {
    t_in_submit = true;
    dev.submit(loop.reactor(), io);
    t_in_submit = false;
  });
}

}  // namespace

TEST_CASE("store: PointDevice serves a point through a Reactor, reading back exactly") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(700 * 16384 + 12345, 16384);
  for (uint64_t s = 0; s < im.slots(); ++s) {
    if (s % 5 != 0) im.random_slot(s, 4'000'000 + s);
  }
  auto p = Commit(*st, 0, im, AllSlots(im));
  Loop loop;  // outlives the device: its resolver thread posts to this reactor
  auto dev = Take(PointDevice::Create(Take(st->open_point(p.id)), "rp-test", 64));
  CHECK(dev->size() == im.size());
  CHECK(dev->caps().read_only);

  // Whole disk, then many unaligned pieces in flight at once.
  {
    std::vector<char> got(im.size());
    Io io(IoKind::kRead, 0, got.size(), got.data());
    Submit(loop, *dev, io);
    CHECK(io.wait() == 0);
    CHECK(!io.inside_submit);
    CHECK(std::memcmp(got.data(), im.bytes.data(), got.size()) == 0);
  }
  std::mt19937_64 rng(99);
  std::vector<std::unique_ptr<Io>> ios;
  std::vector<std::vector<char>> bufs;
  for (int i = 0; i < 200; ++i) {
    uint64_t off = rng() % im.size();
    uint64_t len = std::min<uint64_t>(im.size() - off, rng() % (4 * im.cs) + 1);
    bufs.emplace_back(len);
    ios.push_back(std::make_unique<Io>(IoKind::kRead, off, len, bufs.back().data()));
  }
  for (auto& io : ios) Submit(loop, *dev, *io);
  for (size_t i = 0; i < ios.size(); ++i) {
    REQUIRE(ios[i]->wait() == 0);
    CHECK(!ios[i]->inside_submit);
    CHECK(std::memcmp(bufs[i].data(), im.bytes.data() + ios[i]->offset, ios[i]->length) == 0);
  }
  CHECK(dev->slow_path_requests() > 0);  // the cache (64 leaves) was cold at first

  // A hole-only read, the tail, writes refused, out of range refused.
  {
    std::vector<char> got(im.cs, 'x');
    Io io(IoKind::kRead, 5 * im.cs, im.cs, got.data());
    Submit(loop, *dev, io);
    CHECK(io.wait() == 0);
    CHECK(IsAllZero(got.data(), im.cs));
  }
  {
    std::vector<char> got(100);
    Io io(IoKind::kRead, im.size() - 100, 100, got.data());
    Submit(loop, *dev, io);
    CHECK(io.wait() == 0);
    CHECK(std::memcmp(got.data(), im.bytes.data() + im.size() - 100, 100) == 0);
  }
  {
    std::vector<char> b(4096);
    Io w(IoKind::kWrite, 0, 4096, b.data());
    Submit(loop, *dev, w);
    CHECK(w.wait() == -EPERM);
    Io oor(IoKind::kRead, im.size() - 10, 4096, b.data());
    Submit(loop, *dev, oor);
    CHECK(oor.wait() == -EINVAL);
    Io fl(IoKind::kFlush, 0, 0, nullptr);
    Submit(loop, *dev, fl);
    CHECK(fl.wait() == 0);
  }
  auto ex = Take(dev->block_status(0, im.size(), 1000));
  CHECK(SameExtents(ex, ModelExtents(im)));
  // BLOCK_STATUS from a reactor: answered by the resolver thread (the tree
  // walk never runs on the reactor; debug builds would abort there).
  {
    Io bs(IoKind::kBlockStatus, 0, im.size(), nullptr);
    bs.max_extents = 1000;
    Submit(loop, *dev, bs);
    CHECK(bs.wait() == 0);
    CHECK(!bs.inside_submit);
    CHECK(SameExtents(bs.extents, ex));
    Io one(IoKind::kBlockStatus, im.cs, 10, nullptr);
    one.max_extents = 1;
    Submit(loop, *dev, one);
    CHECK(one.wait() == 0);
    REQUIRE(one.extents.size() == 1);
    CHECK(one.extents[0].length == 10);
    Io oor(IoKind::kBlockStatus, im.size(), 4096, nullptr);
    oor.max_extents = 8;
    Submit(loop, *dev, oor);
    CHECK(oor.wait() == -EINVAL);
  }
  auto ex1 = Take(dev->block_status(im.cs, 10, 1));
  REQUIRE(ex1.size() == 1);
  CHECK(ex1[0].length == 10);
  CHECK(ex1[0].flags == 0);

  // The exported point survives its deletion and a GC while the device lives.
  REQUIRE_OK(V(st->delete_point(p.id)));
  Take(st->collect_garbage());
  {
    std::vector<char> got(im.size());
    Io io(IoKind::kRead, 0, got.size(), got.data());
    Submit(loop, *dev, io);
    CHECK(io.wait() == 0);
    CHECK(std::memcmp(got.data(), im.bytes.data(), got.size()) == 0);
  }
}

TEST_CASE("store: PointDevice fails a read of a damaged chunk with EIO, reads it once healed") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(300 * kCs);
  for (uint64_t s = 0; s < im.slots(); ++s) im.random_slot(s, 9'000'000 + s);
  auto p = Commit(*st, 0, im, AllSlots(im));
  PackEntry bad = CorruptOne(tmp.region(), ObjectKind::kChunk);
  const uint64_t slot = SlotOf(*st, p.id, bad.digest);
  Loop loop;
  auto dev = Take(PointDevice::Create(Take(st->open_point(p.id)), "rp-damage", 64));
  auto read = [&](uint64_t off, uint64_t len, std::vector<char>* out) {
    out->assign(len, 'x');
    Io io(IoKind::kRead, off, len, out->data());
    Submit(loop, *dev, io);
    return io.wait();
  };
  std::vector<char> got;
  // The whole disk (slow path, then cached leaves), a span over the chunk,
  // a few bytes inside it: EIO every time.
  CHECK(read(0, im.size(), &got) == -EIO);
  CHECK(read(slot * kCs - (slot ? 4096 : 0), 2 * kCs, &got) == -EIO);
  CHECK(read(slot * kCs + 100, 512, &got) == -EIO);
  // Everything else reads back exactly, whole chunks and pieces.
  for (uint64_t s = 0; s < im.slots(); s += 37) {
    if (s == slot) continue;
    REQUIRE(read(s * kCs, kCs, &got) == 0);
    CHECK(std::memcmp(got.data(), im.slot(s), kCs) == 0);
    REQUIRE(read(s * kCs + 1000, 3000, &got) == 0);
    CHECK(std::memcmp(got.data(), im.slot(s) + 1000, 3000) == 0);
  }
  // Quarantined from the device's own thread.
  for (int i = 0; i < 200 && Take(st->damaged_slots(p.id)).empty(); ++i) {
    std::this_thread::sleep_for(10ms);
  }
  CHECK(Take(st->damaged_slots(p.id)) == std::vector<uint64_t>{slot});
  CHECK(read(slot * kCs, kCs, &got) == -EIO);
  // Healed by a new point: the same device now reads it.
  auto p2 = Commit(*st, p.id, im, {slot});
  CHECK(p2.new_chunks == 1);
  REQUIRE(read(0, im.size(), &got) == 0);
  CHECK(std::memcmp(got.data(), im.bytes.data(), im.size()) == 0);
}

#ifndef NDEBUG
// Runs fn in a child process marked as a reactor thread; true if it aborted.
bool AbortsOnReactor(const std::function<void()>& fn) {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    alarm(20);  // a hang is a failure, not an abort
    // doctest's crash report of this child is expected noise: silence it.
    int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    dup2(null, 1);
    dup2(null, 2);
    SetReactorThread(true);
    fn();
    _exit(0);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

TEST_CASE("store: debug builds abort when a reactor thread reaches SQLite or a tree page") {
  TmpDir tmp;
  auto st = Open(tmp.region());
  Image im(300 * 16384, 16384);
  for (uint64_t s = 0; s < im.slots(); s += 3) im.random_slot(s, 77 + s);
  auto p = Commit(*st, 0, im, AllSlots(im));
  auto dev = Take(PointDevice::Create(Take(st->open_point(p.id)), "rp-guard", 64));
  // Fine off the reactors.
  CHECK(dev->block_status(0, im.size(), 100).ok());
  CHECK(st->point(p.id).ok());
  // The synchronous paths a reactor must never take (the old BLOCK_STATUS did).
  CHECK(AbortsOnReactor([&] { (void)dev->block_status(0, im.size(), 100); }));
  CHECK(AbortsOnReactor([&] { (void)st->point(p.id); }));
}
#endif

TEST_CASE("store: Exists tells a store from a bare directory; check_present sees it go") {
  TmpDir tmp;
  std::filesystem::create_directories(tmp.region());
  CHECK_FALSE(Store::Exists(tmp.region()));  // a bare mountpoint
  auto st = Open(tmp.region());
  CHECK(Store::Exists(tmp.region()));
  CHECK(st->check_present().ok());
  // Moved away (or removed) while open: Unavailable, naming the directory.
  std::string away = tmp.region() + ".away";
  std::filesystem::rename(tmp.region(), away);
  Status gone = st->check_present();
  CHECK(gone.code() == Code::kUnavailable);
  CHECK(gone.message().find(tmp.region()) != std::string::npos);
  // Another store in its place is not this one.
  std::filesystem::create_directories(tmp.region());
  auto other = Open(tmp.region());
  CHECK(st->check_present().code() == Code::kUnavailable);
  CHECK(other->check_present().ok());
  // Only what is left of a store counts too (its index lost, packs kept).
  std::filesystem::remove(away + "/store.db");
  std::filesystem::remove(away + "/LOCK");
  CHECK(Store::Exists(away));
}

}  // namespace rpoint::store
