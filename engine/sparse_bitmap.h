// SparseBitmap: a bitmap over millions of blocks whose memory follows the bits set.
//
// Bits live in 4 KiB pages (32768 bits each) allocated on first set, found through
// a two-level table whose second level is also allocated on demand. Tracking a
// 1 TiB disk at 64 KiB granularity (16M bits) costs 16 KiB of tables plus one page
// per 2 GiB region that changed. The table never moves, so growing the bitmap is
// safe while other threads test and set bits. Pages are also the unit the change
// tracker writes to its bitmap file.
//
// Thread-safety: test(), set_range(), find_next(), count(), or_page() and resize()
// may run concurrently from any threads (atomic words, pages installed with
// compare-and-swap). clear() and moves need external exclusion.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace rpoint {

class SparseBitmap {
 public:
  static constexpr uint64_t kPageBytes = 4096;
  static constexpr uint64_t kBitsPerPage = kPageBytes * 8;
  static constexpr uint64_t kWordsPerPage = kPageBytes / 8;
  static constexpr uint64_t kFanout = 1024;  // pages per second-level table; tables per bitmap
  static constexpr uint64_t kMaxBits = kBitsPerPage * kFanout * kFanout;  // 2^45

  explicit SparseBitmap(uint64_t nbits = 0);
  SparseBitmap(SparseBitmap&& o) noexcept;
  SparseBitmap& operator=(SparseBitmap&& o) noexcept;
  SparseBitmap(const SparseBitmap&) = delete;
  SparseBitmap& operator=(const SparseBitmap&) = delete;
  ~SparseBitmap();

  uint64_t size() const { return nbits_.load(std::memory_order_acquire); }
  // Grows (new bits clear) or shrinks the logical size, up to kMaxBits.
  void resize(uint64_t nbits);

  bool test(uint64_t bit) const;
  // True when every bit of [first, last] is set.
  bool all_set(uint64_t first, uint64_t last) const;
  void set(uint64_t bit) { set_range(bit, bit); }
  void set_range(uint64_t first, uint64_t last);  // inclusive; clipped to size()
  void set_all();
  void clear();
  // this |= other.
  void merge(const SparseBitmap& other);

  uint64_t count() const;
  // Next set bit at or after `from`, or size() when none.
  uint64_t find_next(uint64_t from) const;

  size_t page_count() const;
  // The page's 4096 bytes (little-endian words), or nullptr when never set.
  const uint64_t* page_words(size_t page) const;
  // ORs 4096 bytes (e.g. read from disk) into page `page`.
  void or_page(size_t page, const uint64_t* words);
  size_t allocated_pages() const;
  size_t memory_bytes() const;

 private:
  struct Page {
    std::atomic<uint64_t> words[kWordsPerPage];
  };
  struct Table {
    std::atomic<Page*> pages[kFanout];
  };
  const Page* find_page(size_t page) const;
  Page* page_for_set(size_t page);
  void free_all();

  std::atomic<uint64_t> nbits_{0};
  std::unique_ptr<std::atomic<Table*>[]> top_;
};

}  // namespace rpoint
