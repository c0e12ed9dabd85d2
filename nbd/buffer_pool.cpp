#include "nbd/buffer_pool.h"

#include <bit>

namespace rpoint::nbd {

namespace {
constexpr size_t kAlign = 4096;
}

AlignedBuffer::AlignedBuffer(size_t capacity) {
  size_t cap = (capacity + kAlign - 1) / kAlign * kAlign;
  if (cap == 0) cap = kAlign;
  p_.reset(static_cast<char*>(std::aligned_alloc(kAlign, cap)));
  if (p_) cap_ = cap;
}

size_t BufferPool::ClassSize(size_t n) { return n <= kAlign ? kAlign : std::bit_ceil(n); }

size_t BufferPool::ClassIndex(size_t class_size) {
  return static_cast<size_t>(std::countr_zero(class_size / kAlign));
}

AlignedBuffer BufferPool::get(size_t n) {
  size_t cs = ClassSize(n);
  size_t idx = ClassIndex(cs);
  if (idx < free_.size() && !free_[idx].empty()) {
    AlignedBuffer b = std::move(free_[idx].back());
    free_[idx].pop_back();
    cached_ -= b.capacity();
    return b;
  }
  return AlignedBuffer(cs);
}

void BufferPool::put(AlignedBuffer b) {
  if (b.empty() || !std::has_single_bit(b.capacity())) return;
  if (cached_ + b.capacity() > budget_) return;  // freed here
  size_t idx = ClassIndex(b.capacity());
  if (idx >= free_.size()) free_.resize(idx + 1);
  cached_ += b.capacity();
  free_[idx].push_back(std::move(b));
}

}  // namespace rpoint::nbd
