// PackWriter builds one pack file (format.h); ReadPackTrailer checks one.
//
// A writer appends objects into a large in-memory buffer and writes it out in
// big sequential pwrites, asking the kernel to start writeback of each one at
// once (sync_file_range) so the fdatasync at seal() finds little left to do.
// The file lives under a ".tmp" name until seal() has made it durable
// (trailer, footer, fdatasync), renamed it to its final name and fsynced the
// directory. Only then may the chunk index name it. A writer destroyed before
// seal() removes its temp file; after a crash, Store::Open removes leftovers.
//
// Thread-safety: none; one user at a time (PointWriter serialises appends and
// hands a full pack to exactly one thread to seal).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "store/catalog.h"
#include "store/format.h"

namespace rpoint::store {

class PackWriter {
 public:
  static Result<std::unique_ptr<PackWriter>> Create(const std::string& packs_dir, uint64_t id,
                                                    size_t buffer_bytes);
  ~PackWriter();
  PackWriter(const PackWriter&) = delete;
  PackWriter& operator=(const PackWriter&) = delete;

  // Appends an object: `len` bytes of data followed by zeroes up to
  // `stored_len` (a disk's partial last chunk is stored full size). Returns the
  // object's offset in the pack.
  Result<uint64_t> append(ObjectKind kind, const Digest& d, const void* data, size_t len,
                          size_t stored_len);
  uint64_t id() const { return id_; }
  uint64_t bytes() const { return size_; }  // objects + header so far
  size_t count() const { return entries_.size(); }
  uint64_t data_bytes() const { return size_ - kPackHeaderBytes; }

  // Makes the pack durable under its final name; after this the writer is spent.
  Result<SealedPack> seal();

 private:
  PackWriter() = default;
  Status flush();

  std::string packs_dir_;
  std::string tmp_path_;
  std::string final_path_;
  uint64_t id_ = 0;
  UniqueFd fd_;
  std::vector<char> buf_;
  size_t buf_used_ = 0;
  uint64_t buf_file_off_ = 0;  // file offset of buf_[0]
  uint64_t size_ = 0;          // logical size: flushed + buffered
  std::vector<PackEntry> entries_;
  bool sealed_ = false;
};

// Reads and checks a sealed pack's header, footer and trailer; the entries it
// lists. Used by tests and scrubbing (and by a future index rebuild).
Result<std::vector<PackEntry>> ReadPackTrailer(int fd, uint64_t expect_id);

}  // namespace rpoint::store
