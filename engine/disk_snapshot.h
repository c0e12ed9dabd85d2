// DiskSnapshot: a disk as it was at a restore point cut, readable while the
// guest keeps writing.
//
// A cut flips the disk's change tracker (no I/O) and installs a snapshot. From
// then on, the first write to a block the restore point still has to copy
// first preserves the old block in a local staging file (copy-before-write into
// fast local storage, Proxmox's "fleecing"), so guest writes never wait on the
// restore point store. The copier reads each block exactly once: from the
// staging file if a write preserved it, else from the disk, while writes to
// that block wait for the read (block by block, never the whole disk).
//
// Only blocks the point will copy are preserved (full: every block; incremental:
// the changed ones), and a block that reads as zeroes at the cut (a hole, an
// unallocated or zeroed block) is recorded in a bitmap instead of the staging
// file, so staging never holds more than the point's non-zero data at the cut.
// The staging file is anonymous (O_TMPFILE, see engine/cut.cpp): no name to
// collide with another point's, nothing left behind by a crash.
//
// A failure to preserve a block (e.g. ENOSPC on staging_dir) breaks the
// snapshot, not the guest: the guest write goes on and the restore point fails
// (qemu's on-cbw-error=break-snapshot).
//
// Thread-safety: read_block/to_copy/finish from job threads;
// preserve_then/needs_preserve from reactor threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "engine/reactor.h"
#include "engine/sparse_bitmap.h"

namespace rpoint {

class DiskSnapshot : public std::enable_shared_from_this<DiskSnapshot> {
 public:
  struct Params {
    std::string disk_name;
    int data_fd;                  // the disk's buffered descriptor
    uint64_t generation;          // the frozen tracker generation
    uint64_t size;                // disk size at the cut
    uint32_t granularity;
    bool full;                    // no retired base: the point stores every allocated block
    std::vector<std::shared_ptr<const SparseBitmap>> frozen;  // incremental: what changed
  };
  // staging_fd: an empty, unnamed file opened read-write (made before the cut's pause).
  static Result<std::shared_ptr<DiskSnapshot>> Create(Params params, UniqueFd staging_fd);
  ~DiskSnapshot();

  uint64_t generation() const { return p_.generation; }
  uint64_t size() const { return p_.size; }
  uint32_t granularity() const { return p_.granularity; }
  uint64_t block_count() const { return nblocks_; }
  bool full() const { return p_.full; }
  const std::string& disk_name() const { return p_.disk_name; }

  // Blocks the restore point must store: for a full point every block allocated
  // at the cut, else every block changed since the last retired point.
  // Computed once, after the cut (never during the pause).
  Result<SparseBitmap> to_copy();

  // Copies block b as it was at the cut into buf (granularity bytes; the tail
  // past size() is zero). Blocking; each block is read at most once. Job threads.
  Status read_block(uint64_t block, char* buf);

  // Stops copy-before-write. Idempotent. The staging file is freed with the
  // last reference (CoW operations in flight hold one).
  void finish();
  bool broken() const { return broken_.load(); }
  std::string broken_reason() const;

  // ---- data path (reactor threads) ----
  bool needs_preserve(uint64_t block) const;
  // Preserves blocks [first, last] that need it, then runs `cont` on `reactor`'s thread.
  void preserve_then(Reactor& reactor, uint64_t first, uint64_t last, std::function<void()> cont);

  // Blocks whose cut content is in the staging file, and blocks recorded as
  // zero at the cut (no staging bytes).
  uint64_t blocks_preserved() const { return preserved_count_.load(); }
  uint64_t blocks_zero() const { return zero_count_.load(); }
  // Bytes the staging file occupies on its filesystem (st_blocks).
  Result<uint64_t> staging_bytes() const;

 private:
  class CowOp;
  struct Waiter {
    Reactor* reactor;
    std::function<void()> resume;
  };
  explicit DiskSnapshot(Params p);
  // error: 0 or an errno; zero: the block read as zeroes (nothing was staged).
  void preserved(uint64_t block, int error, bool zero);
  void release_busy(uint64_t block);  // mu_ held by caller: wakes waiters

  Params p_;
  uint64_t nblocks_;
  UniqueFd staging_fd_;
  std::atomic<bool> finished_{false};
  std::atomic<bool> broken_{false};
  SparseBitmap copied_;     // read by the copier or preserved: writes may proceed
  SparseBitmap preserved_;  // the old content is in the staging file
  SparseBitmap zero_;       // the old content was all zeroes (not staged)
  std::atomic<uint64_t> preserved_count_{0};
  std::atomic<uint64_t> zero_count_{0};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint64_t, std::vector<Waiter>> busy_;  // block -> writes waiting on it
  std::string broken_reason_;
};

}  // namespace rpoint
