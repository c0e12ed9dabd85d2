// BufferPool: 4096-aligned data buffers for one connection, recycled by size
// class so the data path makes no heap allocation per request.
//
// Buffers come in power-of-two classes from 4 KiB up; freed buffers are kept
// for reuse up to a byte budget and released beyond it, so one burst of huge
// requests does not pin memory for the life of the connection.
//
// Thread-safety: none; owned by one connection on one reactor thread.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <vector>

namespace rpoint::nbd {

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Allocates `capacity` bytes (rounded up to 4096) aligned to 4096; empty on failure.
  explicit AlignedBuffer(size_t capacity);
  AlignedBuffer(AlignedBuffer&& o) noexcept : p_(std::move(o.p_)), cap_(o.cap_) { o.cap_ = 0; }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    p_ = std::move(o.p_);
    cap_ = o.cap_;
    o.cap_ = 0;
    return *this;
  }
  char* data() const { return p_.get(); }
  size_t capacity() const { return cap_; }
  bool empty() const { return !p_; }

 private:
  std::unique_ptr<char, FreeDeleter> p_;
  size_t cap_ = 0;
};

class BufferPool {
 public:
  explicit BufferPool(size_t cache_budget) : budget_(cache_budget) {}
  // A buffer of at least n bytes (n > 0); empty when memory is exhausted.
  AlignedBuffer get(size_t n);
  void put(AlignedBuffer b);
  size_t cached_bytes() const { return cached_; }

  static size_t ClassSize(size_t n);

 private:
  static size_t ClassIndex(size_t class_size);
  std::vector<std::vector<AlignedBuffer>> free_;  // by class index
  size_t budget_;
  size_t cached_ = 0;
};

}  // namespace rpoint::nbd
