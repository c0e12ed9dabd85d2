// PackWriter builds one pack file (format.h); ReadPackTrailer checks one.
//
// A writer appends objects into a large in-memory buffer. A full buffer goes
// to the pack's flusher thread, which writes it with one big pwrite while the
// appends go on into the next buffer (double-buffered: the caller holds its
// writer's lock while appending, never while a buffer is written). Buffers
// come from a BufferPool the caller may share between its packs, so memory
// stays bounded however many packs wait to be sealed.
//
// Aligned buffers are written with O_DIRECT when the filesystem takes it
// (every object is a multiple of 4 KiB and starts 4 KiB aligned): no copy into
// the page cache and no later writeback, which were the largest CPU cost of a
// point's copy-out. Anything unaligned (the trailer, an object of odd size, a
// filesystem refusing O_DIRECT) is written through the page cache, with
// writeback started at once (sync_file_range) so the fdatasync at seal()
// finds little to do.
//
// The file lives under a ".tmp" name until seal() has made it durable (every
// buffer written, trailer, footer, fdatasync), renamed it to its final name
// and fsynced the directory. Only then may the chunk index name it. A write
// failure of the flusher fails the next append() or seal(). A writer
// destroyed before seal() removes its temp file; after a crash, Store::Open
// removes leftovers.
//
// Thread-safety: append()/close()/seal() by one user at a time (PointWriter
// serialises appends and hands a full pack to exactly one thread to seal);
// the flusher thread is internal. BufferPool: any thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "store/catalog.h"
#include "store/format.h"

namespace rpoint::store {

// Write buffers of one size, 4 KiB aligned (O_DIRECT), at most `max` out at
// once: get() waits for a put() beyond that.
class BufferPool {
 public:
  BufferPool(size_t buffer_bytes, size_t max);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  size_t buffer_bytes() const { return bytes_; }
  char* get();
  void put(char* b);

 private:
  const size_t bytes_;
  const size_t max_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<char*> free_;
  size_t out_ = 0;
};

class PackWriter {
 public:
  // `pool`: where the buffers come from (null: a private pool of two).
  // `direct`: write aligned buffers with O_DIRECT when the filesystem allows.
  static Result<std::unique_ptr<PackWriter>> Create(const std::string& packs_dir, uint64_t id,
                                                    size_t buffer_bytes,
                                                    std::shared_ptr<BufferPool> pool = nullptr,
                                                    bool direct = true);
  ~PackWriter();
  PackWriter(const PackWriter&) = delete;
  PackWriter& operator=(const PackWriter&) = delete;

  // Appends an object: `len` bytes of data followed by zeroes up to
  // `stored_len` (a disk's partial last chunk is stored full size). Returns the
  // object's offset in the pack. Fails with the flusher's error, if any.
  Result<uint64_t> append(ObjectKind kind, const Digest& d, const void* data, size_t len,
                          size_t stored_len);
  // No more appends: hands the last buffer to the flusher now (a full pack
  // queued for sealing holds no buffer while it waits). seal() does it too.
  void close();
  uint64_t id() const { return id_; }
  uint64_t bytes() const { return size_; }  // objects + header so far
  size_t count() const { return entries_.size(); }
  uint64_t data_bytes() const { return size_ - kPackHeaderBytes; }
  bool direct() const { return dfd_.get() >= 0; }  // O_DIRECT in use (tests)

  // Makes the pack durable under its final name; after this the writer is spent.
  Result<SealedPack> seal();

 private:
  struct Flush {
    char* buf;
    size_t len;
    uint64_t off;
  };
  PackWriter() = default;
  Status take_buffer();   // cur_ from the pool; fails with the flusher's error
  void hand_off();        // cur_ (if it holds bytes) to the flusher
  Status wait_flushed();  // every handed-off buffer written; stops the flusher
  void flusher_loop();
  Status write_out(const Flush& f);  // one buffer: O_DIRECT if aligned, else buffered

  std::string packs_dir_;
  std::string tmp_path_;
  std::string final_path_;
  uint64_t id_ = 0;
  UniqueFd fd_;   // buffered
  UniqueFd dfd_;  // O_DIRECT on the same file, or none
  std::shared_ptr<BufferPool> pool_;
  char* cur_ = nullptr;
  size_t buf_bytes_ = 0;
  size_t buf_used_ = 0;
  uint64_t buf_file_off_ = 0;  // file offset of cur_[0]
  uint64_t size_ = 0;          // logical size: handed off + buffered
  std::vector<PackEntry> entries_;
  bool closed_ = false;
  bool sealed_ = false;

  std::mutex fmu_;  // guards the flusher's state below
  std::condition_variable fcv_;
  std::deque<Flush> queue_;
  size_t in_flight_ = 0;  // queued + being written
  bool stop_ = false;
  Status write_error_;
  std::thread flusher_;
};

// Reads and checks a sealed pack's header, footer and trailer; the entries it
// lists. Used by tests and scrubbing (and by a future index rebuild).
Result<std::vector<PackEntry>> ReadPackTrailer(int fd, uint64_t expect_id);

}  // namespace rpoint::store
