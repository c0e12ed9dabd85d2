#include "engine/sparse_bitmap.h"

#include <doctest/doctest.h>

#include <random>
#include <set>
#include <thread>
#include <vector>

using rpoint::SparseBitmap;

TEST_CASE("sparse bitmap: set, test, find_next and count agree with a reference set") {
  SparseBitmap bm(5'000'000);
  std::set<uint64_t> ref;
  std::mt19937_64 rng(42);
  for (int i = 0; i < 2000; ++i) {
    uint64_t first = rng() % bm.size();
    uint64_t len = rng() % 200;
    uint64_t last = std::min(first + len, bm.size() - 1);
    bm.set_range(first, last);
    for (uint64_t b = first; b <= last; ++b) ref.insert(b);
  }
  CHECK(bm.count() == ref.size());
  uint64_t b = bm.find_next(0);
  for (uint64_t want : ref) {
    REQUIRE(b == want);
    b = bm.find_next(b + 1);
  }
  CHECK(b == bm.size());
  for (int i = 0; i < 10000; ++i) {
    uint64_t x = rng() % bm.size();
    CHECK(bm.test(x) == (ref.count(x) == 1));
  }
}

TEST_CASE("sparse bitmap: memory follows the bits set, not the size (1 TiB at 64 KiB)") {
  const uint64_t blocks = (1ull << 40) / (64 * 1024);  // 16M bits
  SparseBitmap bm(blocks);
  CHECK(bm.memory_bytes() < 16 * 1024);
  // 1 GiB of changes in one region: 16384 bits.
  bm.set_range(1'000'000, 1'000'000 + 16383);
  CHECK(bm.count() == 16384);
  CHECK(bm.memory_bytes() < 64 * 1024);
  // Even every bit set stays at the flat size plus small tables.
  bm.set_all();
  CHECK(bm.count() == blocks);
  CHECK(bm.memory_bytes() < blocks / 8 + 64 * 1024);
}

TEST_CASE("sparse bitmap: grow keeps bits, shrink clears the tail") {
  SparseBitmap bm(100);
  bm.set_range(90, 99);
  bm.resize(1'000'000);
  CHECK(bm.count() == 10);
  bm.set(999'999);
  bm.resize(95);
  CHECK(bm.count() == 5);
  bm.resize(1'000'000);
  CHECK_FALSE(bm.test(999'999));
  CHECK_FALSE(bm.test(96));
  CHECK(bm.test(94));
}

TEST_CASE("sparse bitmap: concurrent setters lose no bit") {
  SparseBitmap bm(1 << 22);
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&bm, t] {
      for (uint64_t b = t; b < bm.size(); b += 4) bm.set(b);
    });
  }
  for (auto& t : ts) t.join();
  CHECK(bm.count() == bm.size());
}

TEST_CASE("sparse bitmap: merge is a union") {
  SparseBitmap a(70000), b(70000);
  a.set_range(0, 10);
  b.set_range(5, 40000);
  a.merge(b);
  CHECK(a.count() == 40001);
}
