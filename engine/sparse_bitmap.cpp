#include "engine/sparse_bitmap.h"

#include <algorithm>
#include <bit>
#include <utility>

namespace rpoint {

SparseBitmap::SparseBitmap(uint64_t nbits) : top_(std::make_unique<std::atomic<Table*>[]>(kFanout)) {
  for (uint64_t i = 0; i < kFanout; ++i) top_[i].store(nullptr, std::memory_order_relaxed);
  resize(nbits);
}

SparseBitmap::SparseBitmap(SparseBitmap&& o) noexcept
    : nbits_(o.nbits_.exchange(0)), top_(std::move(o.top_)) {}

SparseBitmap& SparseBitmap::operator=(SparseBitmap&& o) noexcept {
  if (this != &o) {
    free_all();
    nbits_.store(o.nbits_.exchange(0));
    top_ = std::move(o.top_);
  }
  return *this;
}

SparseBitmap::~SparseBitmap() { free_all(); }

void SparseBitmap::free_all() {
  if (!top_) return;
  for (uint64_t t = 0; t < kFanout; ++t) {
    std::unique_ptr<Table> table(top_[t].exchange(nullptr));
    if (!table) continue;
    for (auto& p : table->pages) std::unique_ptr<Page> page(p.exchange(nullptr));
  }
}

void SparseBitmap::clear() { free_all(); }

size_t SparseBitmap::page_count() const {
  return static_cast<size_t>((size() + kBitsPerPage - 1) / kBitsPerPage);
}

void SparseBitmap::resize(uint64_t nbits) {
  nbits = std::min(nbits, kMaxBits);
  uint64_t old = size();
  if (nbits < old) {
    // Clear the bits past the new end so a later grow starts clean.
    for (uint64_t b = find_next(nbits); b < old; b = find_next(b + 1)) {
      Page* p = const_cast<Page*>(find_page(b / kBitsPerPage));
      uint64_t in = b % kBitsPerPage;
      p->words[in / 64].fetch_and(~(1ull << (in % 64)));
    }
  }
  nbits_.store(nbits, std::memory_order_release);
}

const SparseBitmap::Page* SparseBitmap::find_page(size_t page) const {
  const Table* t = top_[page / kFanout].load(std::memory_order_acquire);
  return t ? t->pages[page % kFanout].load(std::memory_order_acquire) : nullptr;
}

SparseBitmap::Page* SparseBitmap::page_for_set(size_t page) {
  std::atomic<Table*>& slot = top_[page / kFanout];
  Table* t = slot.load(std::memory_order_acquire);
  if (!t) {
    auto fresh = std::make_unique<Table>();
    for (auto& p : fresh->pages) p.store(nullptr, std::memory_order_relaxed);
    if (slot.compare_exchange_strong(t, fresh.get(), std::memory_order_acq_rel)) t = fresh.release();
  }
  std::atomic<Page*>& pslot = t->pages[page % kFanout];
  Page* p = pslot.load(std::memory_order_acquire);
  if (p) return p;
  auto fresh = std::make_unique<Page>();
  for (auto& w : fresh->words) w.store(0, std::memory_order_relaxed);
  if (pslot.compare_exchange_strong(p, fresh.get(), std::memory_order_acq_rel)) return fresh.release();
  return p;  // another thread installed one first; `fresh` is freed
}

bool SparseBitmap::test(uint64_t bit) const {
  if (bit >= size()) return false;
  const Page* p = find_page(bit / kBitsPerPage);
  if (!p) return false;
  uint64_t in = bit % kBitsPerPage;
  return (p->words[in / 64].load(std::memory_order_acquire) >> (in % 64)) & 1;
}

bool SparseBitmap::all_set(uint64_t first, uint64_t last) const {
  for (uint64_t b = first; b <= last; ++b) {
    if (!test(b)) return false;
  }
  return true;
}

void SparseBitmap::set_range(uint64_t first, uint64_t last) {
  uint64_t n = size();
  if (n == 0 || first >= n) return;
  last = std::min(last, n - 1);
  uint64_t b = first;
  while (b <= last) {
    Page* p = page_for_set(b / kBitsPerPage);
    uint64_t in = b % kBitsPerPage;
    uint64_t shift = in % 64;
    uint64_t cnt = std::min<uint64_t>(64 - shift, last - b + 1);
    uint64_t mask = (cnt == 64 ? ~0ull : ((1ull << cnt) - 1)) << shift;
    p->words[in / 64].fetch_or(mask, std::memory_order_acq_rel);
    b += cnt;
  }
}

void SparseBitmap::set_all() {
  if (size() > 0) set_range(0, size() - 1);
}

void SparseBitmap::merge(const SparseBitmap& other) {
  size_t np = std::min(page_count(), other.page_count());
  for (size_t i = 0; i < np; ++i) {
    const uint64_t* w = other.page_words(i);
    if (w) or_page(i, w);
  }
}

uint64_t SparseBitmap::count() const {
  uint64_t n = 0;
  for (uint64_t b = find_next(0); b < size(); b = find_next(b + 1)) ++n;
  return n;
}

uint64_t SparseBitmap::find_next(uint64_t from) const {
  uint64_t n = size();
  while (from < n) {
    size_t pi = from / kBitsPerPage;
    if (!top_[pi / kFanout].load(std::memory_order_acquire)) {
      from = (pi / kFanout + 1) * kFanout * kBitsPerPage;
      continue;
    }
    const Page* p = find_page(pi);
    if (!p) {
      from = (pi + 1) * kBitsPerPage;
      continue;
    }
    uint64_t in = from % kBitsPerPage;
    uint64_t wi = in / 64;
    uint64_t w = p->words[wi].load(std::memory_order_acquire) & (~0ull << (in % 64));
    for (;;) {
      if (w) {
        uint64_t bit = pi * kBitsPerPage + wi * 64 + std::countr_zero(w);
        return std::min(bit, n);
      }
      if (++wi == kWordsPerPage) break;
      w = p->words[wi].load(std::memory_order_acquire);
    }
    from = (pi + 1) * kBitsPerPage;
  }
  return n;
}

const uint64_t* SparseBitmap::page_words(size_t page) const {
  static_assert(sizeof(std::atomic<uint64_t>) == sizeof(uint64_t));
  const Page* p = find_page(page);
  return p ? reinterpret_cast<const uint64_t*>(p->words) : nullptr;
}

void SparseBitmap::or_page(size_t page, const uint64_t* words) {
  if (page >= page_count()) return;
  bool any = false;
  for (size_t i = 0; i < kWordsPerPage && !any; ++i) any = words[i] != 0;
  if (!any) return;
  Page* p = page_for_set(page);
  for (size_t i = 0; i < kWordsPerPage; ++i) {
    if (words[i]) p->words[i].fetch_or(words[i], std::memory_order_acq_rel);
  }
}

size_t SparseBitmap::allocated_pages() const {
  size_t n = 0;
  for (uint64_t t = 0; t < kFanout; ++t) {
    const Table* table = top_[t].load(std::memory_order_acquire);
    if (!table) continue;
    for (const auto& p : table->pages) n += p.load(std::memory_order_acquire) != nullptr;
  }
  return n;
}

size_t SparseBitmap::memory_bytes() const {
  size_t tables = 0;
  for (uint64_t t = 0; t < kFanout; ++t) tables += top_[t].load() != nullptr;
  return kFanout * sizeof(std::atomic<Table*>) + tables * sizeof(Table) +
         allocated_pages() * sizeof(Page);
}

}  // namespace rpoint
