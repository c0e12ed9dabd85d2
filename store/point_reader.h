// PointReader: random access to one committed disk point.
//
// Opening a point pins its root: it stays readable, even if the point is
// deleted meanwhile, until the last holder of the reader lets go. Reads walk
// the tree through the store's page cache (pages are verified on load), find
// each chunk in the index and pread it from its pack; holes are zero-filled
// without I/O. Every chunk read is re-hashed (whole, also for a read of a few
// bytes of it): one failing its SHA-256 fails the read with IoError naming
// the disk range and is quarantined (Store::quarantine), never returned. extents() answers from the
// tree alone, skipping whole hole subtrees, so mapping a huge sparse disk costs only its allocated
// part.
//
// resolve() is the building block of PointDevice: it turns a run of slots into
// pack locations ahead of time, so the device can issue the data reads on a
// reactor's ring without touching SQLite or the tree on the loop thread.
//
// Thread-safety: every method is safe from any thread, concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "engine/block_device.h"
#include "store/store.h"
#include "store/tree.h"

namespace rpoint::store {

class PointReader {
 public:
  ~PointReader();
  PointReader(const PointReader&) = delete;
  PointReader& operator=(const PointReader&) = delete;

  const PointInfo& info() const { return info_; }
  uint64_t size() const { return info_.size; }
  uint32_t chunk_size() const { return info_.chunk_size; }
  uint64_t slots() const { return slots_; }

  // How read() fetches whole chunks from their packs: through the page cache
  // (exports: read-ahead, and reads that come back), or O_DIRECT into buf
  // when buf is 4 KiB aligned (a restore, reading each chunk once: no copy
  // through the page cache). Partly covered chunks are always cached.
  enum class ReadMode { kCached, kDirect };
  // Copies [offset, offset+len) of the disk into buf. IoError when a chunk
  // of the range is damaged or missing.
  Status read(uint64_t offset, uint64_t len, void* buf, ReadMode mode = ReadMode::kCached);

  // Allocation map of [offset, offset+len) in NBD base:allocation terms: holes
  // are kHole|kZero, stored chunks 0. Adjacent runs of one kind are merged;
  // at most max_extents entries (the last may end before offset+len).
  Result<std::vector<Extent>> extents(uint64_t offset, uint64_t len, size_t max_extents = SIZE_MAX);

  // Which blocks of [offset, offset+len) differ from `other` (an earlier or
  // later point of the same disk), by chunk digest: no data is read. Flags
  // MetaContext::kDirty (differs: content changed, or stored in one and a
  // hole in the other) or 0 (same digest, so same bytes; rewriting
  // identical bytes is "unchanged"). Merged runs, at most max_extents. The
  // cost is the tree pages of the differing subtrees only.
  // InvalidArgument when the chunk sizes differ.
  Result<std::vector<Extent>> changed_extents(PointReader& other, uint64_t offset, uint64_t len,
                                              size_t max_extents = SIZE_MAX);

  // The chunk digest of one slot (zero: a hole), and any tree node
  // (level 0 = slots; level depth() = the root). For tests and diffing.
  Result<Digest> slot_digest(uint64_t slot);
  Result<Digest> node(uint32_t level, uint64_t index) { return tree_.node(level, index); }
  uint32_t depth() const { return tree_.depth(); }

  // Where a slot's data lives.
  struct Location {
    enum State : uint8_t { kHole = 0, kData = 1, kMissing = 2 };
    State state = kHole;
    uint64_t offset = 0;           // in the pack
    std::shared_ptr<PackFd> pack;  // kData only
    Digest digest;                 // kData and kMissing: the chunk's name
  };
  // Locations of slots [first, first+count), which must lie in one leaf page
  // (128 slots). A chunk missing from the index (or its pack) is kMissing.
  Result<std::vector<Location>> resolve(uint64_t first, uint32_t count);

  // A handle on pack `id` (opened through the store's PackCache if need be:
  // not on a reactor thread); the file stays open while the handle lives.
  // NotFound when GC removed the pack (resolve again).
  Result<std::shared_ptr<PackFd>> pack(uint64_t id);
  // The same if the pack is open right now, else nullptr: never a syscall.
  std::shared_ptr<PackFd> open_pack(uint64_t id);

  // Checks one whole chunk read from `l` (chunk_size() bytes) against its
  // digest; on a mismatch quarantines it and returns IoError naming `slot`'s
  // disk range. May touch SQLite: never call it on a reactor thread.
  Status check_chunk(uint64_t slot, const Location& l, const void* data);
  // The chunk `d` at (pack, offset), named by `slot`, failed its checksum:
  // quarantines it and returns the IoError for the read. Not on a reactor.
  Status damaged_chunk(uint64_t slot, const Digest& d, uint64_t pack, uint64_t offset);
  // The error for a damaged or missing chunk at `slot`.
  Status chunk_error(uint64_t slot, const std::string& what) const;

 private:
  friend class Store;
  PointReader(std::shared_ptr<Store> store, PointInfo info);

  std::shared_ptr<Store> store_;
  PointInfo info_;
  uint64_t slots_ = 0;
  TreeView tree_;
};

}  // namespace rpoint::store
