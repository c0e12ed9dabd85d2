// Unit tests for store/pack_cache: the bounded LRU of open pack files.
// Real files under $TMPDIR; descriptors are counted in /proc/self/fd.
#include "store/pack_cache.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace rpoint::store {
namespace {

namespace fs = std::filesystem;

size_t OpenFds() {
  size_t n = 0;
  for (auto it = fs::directory_iterator("/proc/self/fd"); it != fs::directory_iterator(); ++it) ++n;
  return n;
}

// N small files, each holding its own id as text: a read through a handle
// proves the fd still names that file.
struct Files {
  explicit Files(int n) {
    const char* t = std::getenv("TMPDIR");
    dir = fs::path(t ? t : "/var/tmp") / ("pack_cache_test." + std::to_string(getpid()));
    fs::create_directories(dir);
    for (int i = 1; i <= n; ++i) std::ofstream(path(i)) << "pack " << i;
  }
  ~Files() { fs::remove_all(dir); }
  std::string path(uint64_t id) const { return (dir / (std::to_string(id) + ".pack")).string(); }
  fs::path dir;
};

std::string ReadAll(const PackFd& p) {
  char buf[64];
  ssize_t n = ::pread(p.fd.get(), buf, sizeof(buf), 0);
  return n > 0 ? std::string(buf, size_t(n)) : std::string();
}

std::shared_ptr<PackFd> Get(PackCache& c, uint64_t owner, uint64_t id, const Files& f) {
  auto r = c.get(owner, id, f.path(id));
  REQUIRE(r.ok());
  return std::move(r).value();
}

}  // namespace

TEST_CASE("pack cache: unheld packs beyond the bound are closed, least recently used first") {
  Files f(6);
  size_t base = OpenFds();
  auto c = PackCache::Create(3);
  uint64_t o = c->new_owner();
  for (uint64_t id = 1; id <= 5; ++id) {
    auto h = Get(*c, o, id, f);
    CHECK(ReadAll(*h) == "pack " + std::to_string(id));
  }
  CHECK(c->open_count() == 3);
  CHECK(OpenFds() == base + 3);
  CHECK(c->try_get(o, 1) == nullptr);  // evicted
  CHECK(c->try_get(o, 2) == nullptr);
  CHECK(c->try_get(o, 3) != nullptr);  // now the most recently used
  Get(*c, o, 6, f);                    // evicts 4, the least recently used
  CHECK(c->try_get(o, 4) == nullptr);
  CHECK(c->try_get(o, 3) != nullptr);
  CHECK(c->try_get(o, 6) != nullptr);
  CHECK(c->try_get(o, 99) == nullptr);  // try_get never opens
  c.reset();
  CHECK(OpenFds() == base);
}

TEST_CASE("pack cache: a held pack is never closed; released, the bound holds again") {
  Files f(8);
  size_t base = OpenFds();
  auto c = PackCache::Create(2);
  uint64_t o = c->new_owner();
  std::vector<std::shared_ptr<PackFd>> held;
  for (uint64_t id = 1; id <= 8; ++id) held.push_back(Get(*c, o, id, f));
  CHECK(c->open_count() == 8);  // over the bound: all in use
  CHECK(c->held_count() == 8);
  for (uint64_t id = 1; id <= 8; ++id)
    CHECK(ReadAll(*held[id - 1]) == "pack " + std::to_string(id));
  // A second handle on a held pack shares its file.
  auto again = Get(*c, o, 1, f);
  CHECK(again->fd.get() == held[0]->fd.get());
  CHECK(OpenFds() == base + 8);
  held.clear();
  again.reset();
  // Released while over the bound: closed at once, not at the next get().
  CHECK(c->open_count() == 2);
  CHECK(c->held_count() == 0);
  CHECK(OpenFds() == base + 2);
}

TEST_CASE("pack cache: a dropped pack stays open for its holders, then closes") {
  Files f(2);
  size_t base = OpenFds();
  auto c = PackCache::Create(4);
  uint64_t o = c->new_owner(), other = c->new_owner();
  auto h = Get(*c, o, 1, f);
  Get(*c, other, 1, f);  // same pack id, another store: its own entry
  CHECK(c->open_count() == 2);
  c->drop(o, 1);
  CHECK(c->try_get(o, 1) == nullptr);
  CHECK(c->try_get(other, 1) != nullptr);
  CHECK(ReadAll(*h) == "pack 1");  // still open
  // Re-opened after a drop: a new file, and the old handle's release does
  // not disturb the new entry's accounting.
  auto h2 = Get(*c, o, 1, f);
  CHECK(h2->fd.get() != h->fd.get());
  h.reset();
  CHECK(c->held_count() == 1);
  CHECK(ReadAll(*h2) == "pack 1");
  h2.reset();
  c->drop_owner(other);
  CHECK(c->open_count() == 1);
  CHECK(OpenFds() == base + 1);
  // A handle may outlive its cache.
  auto last = Get(*c, o, 2, f);
  c.reset();
  CHECK(ReadAll(*last) == "pack 2");
  last.reset();
  CHECK(OpenFds() == base);
}

TEST_CASE("pack cache: concurrent readers never see a pack closed or reused under them") {
  constexpr int kPacks = 40;
  constexpr size_t kCap = 4;
  Files f(kPacks);
  size_t base = OpenFds();
  auto c = PackCache::Create(kCap);
  uint64_t o = c->new_owner();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0}, bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(t * 7919 + 1);
      std::vector<std::shared_ptr<PackFd>> mine;
      while (!stop.load()) {
        uint64_t id = 1 + rng() % kPacks;
        std::shared_ptr<PackFd> h;
        switch (rng() % 8) {
          case 0:
            c->drop(o, id);
            break;
          case 1:
            h = c->try_get(o, id);
            break;
          default: {
            auto r = c->get(o, id, f.path(id));
            if (r.ok())
              h = std::move(r).value();
            else
              bad.fetch_add(1);
          }
        }
        if (h) mine.push_back(std::move(h));
        // Hold a few for a while, as queued reads do; check every one.
        if (mine.size() > 6 || rng() % 3 == 0) {
          for (const auto& m : mine) {
            reads.fetch_add(1);
            if (ReadAll(*m) != "pack " + std::to_string(m->id)) bad.fetch_add(1);
          }
          mine.clear();
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  stop.store(true);
  for (auto& t : ts) t.join();
  CHECK(bad.load() == 0);
  CHECK(reads.load() > 1000);
  CHECK(c->held_count() == 0);
  CHECK(c->open_count() <= kCap);
  CHECK(OpenFds() <= base + kCap);
  c.reset();
  CHECK(OpenFds() == base);
}

}  // namespace rpoint::store
