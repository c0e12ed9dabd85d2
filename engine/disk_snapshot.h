// DiskSnapshot: a disk as it was at a restore point cut, readable while the
// guest keeps writing.
//
// A cut flips the disk's change tracker (no I/O) and installs a snapshot. From
// then on, the first write to a block the restore point still has to copy
// first preserves the old content of the 4 KiB sub-blocks it touches (never
// the whole tracking block: a 4 KiB write into a 64 KiB block costs one 4 KiB
// read, not a 64 KiB read and write). The old sub-blocks are appended to an
// in-memory log that is written behind, in runs of up to 1 MiB, to a local
// staging file (copy-before-write into fast local storage, Proxmox's
// "fleecing"), so guest writes never wait on the restore point store nor on
// the staging write. The copier reads each block exactly once (the disk for
// the sub-blocks nobody preserved, the log for the rest), holding no block:
// a write into a run being read preserves for itself (read_blocks: why).
//
// Only blocks the point will copy are preserved (full: every block; incremental:
// the changed ones), and a sub-block that reads as zeroes at the cut (a hole,
// an unallocated or zeroed range) is recorded as such instead of staged, so
// staging never holds more than the point's non-zero data at the cut. The
// staging file is anonymous (O_TMPFILE, see engine/cut.cpp): no name to
// collide with another point's, nothing left behind by a crash. At most
// kMaxUnflushed bytes of the log wait in memory; past that, preserving writes
// wait for the staging file to catch up.
//
// A failure to stage (e.g. ENOSPC on staging_dir) breaks the snapshot, not the
// guest: the guest write goes on and the restore point fails (qemu's
// on-cbw-error=break-snapshot).
//
// The copier yields to the guest: while guest requests keep arriving on the
// disk (Params::guest_ops moves), each read_block first sleeps so that a copy
// thread works at most kGuestBusyDuty of its time (bounded per block, so the
// copy always ends); with the guest quiet it runs flat out.
//
// It also reads through the page cache while the guest writes to a buffered
// disk (Params::guest_writes moves; read_blocks: why), and with O_DIRECT once
// the guest has not written for kQuietBeforeDirect, or always on a disk whose
// guest I/O is O_DIRECT. Guest reads alone keep it on O_DIRECT: they take no
// lock an O_DIRECT read holds, and a buffered copy would spend the CPU (a copy
// of every page) and the page cache the guest's reads need. One sampler of
// both counters (watch_guest) serves both decisions.
//
// Thread-safety: read_block(s)/to_copy/finish from job threads;
// preserve_then/needs_preserve from reactor threads.
#pragma once

#include <atomic>
#include <chrono>
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
    int data_fd;          // the disk's buffered descriptor
    uint64_t generation;  // the frozen tracker generation
    uint64_t size;        // disk size at the cut
    uint32_t granularity;
    bool full;  // no retired base: the point stores every allocated block
    std::vector<std::shared_ptr<const SparseBitmap>> frozen;  // incremental: what changed
    // Counts the guest's requests on the disk (the copier yields while it
    // moves); nullptr: never yield.
    const std::atomic<uint64_t>* guest_ops = nullptr;
    // Counts the guest's writes, trims and zeroes (a subset of guest_ops):
    // while it moves on a buffered disk the copier reads through the page
    // cache; nullptr: always O_DIRECT when it has a descriptor for that.
    const std::atomic<uint64_t>* guest_writes = nullptr;
    // The disk serves the guest with O_DIRECT (io.direct): the copier's runs
    // are always read O_DIRECT when it has a descriptor for that.
    bool guest_direct = false;
  };
  // Unflushed staging log bytes held in memory before preserving writes wait.
  static constexpr uint64_t kMaxUnflushed = 64ull << 20;
  // The share of its time a copy thread may work while the guest is busy.
  static constexpr double kGuestBusyDuty = 0.1;
  // On a buffered disk, how long the guest must have been quiet (no write,
  // trim or zero submitted) before the copier reads its runs with O_DIRECT again.
  static constexpr std::chrono::milliseconds kQuietBeforeDirect{1000};
  // staging_fd: an empty, unnamed file opened read-write (made before the cut is published).
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
  // Computed once, after the cut (never while the cut is being published).
  Result<SparseBitmap> to_copy();

  // Copies block b as it was at the cut into buf (granularity bytes; the tail
  // past size() is zero). Blocking; each block is read at most once; yields
  // to guest I/O first (see above). Job threads.
  Status read_block(uint64_t block, char* buf);
  // read_block() for the adjacent blocks [first, first + n) into buf (n x
  // granularity bytes), with one read of the disk for the whole run instead
  // of one per block. `direct_fd`: the disk opened with O_DIRECT, or -1; used
  // when buf is 4 KiB aligned (no copy through the page cache, which flushes
  // dirty pages of the range first, so the read sees every completed write),
  // unless the guest is busy on a buffered disk (see above); else, and where
  // the filesystem refuses it, the buffered descriptor.
  Status read_blocks(uint64_t first, uint32_t n, char* buf, int direct_fd = -1);
  // Runs read_blocks was given a direct_fd for but read through the page
  // cache because the guest was busy on a buffered disk (tests, diagnostics).
  uint64_t runs_read_buffered() const { return runs_buffered_.load(); }

  // Stops copy-before-write. Idempotent. The staging file is freed with the
  // last reference (CoW operations in flight hold one). Waits (at most 2 s)
  // for a write-behind to staging in flight to end, so no ring operation
  // outlives the point's use of the snapshot: never call it on a reactor.
  void finish();
  bool broken() const { return broken_.load(); }
  std::string broken_reason() const;

  // ---- data path (reactor threads) ----
  bool needs_preserve(uint64_t block) const;
  // Preserves the sub-blocks of [offset, offset + length) that need it, then
  // runs `cont` (on `reactor`'s thread, maybe before returning).
  void preserve_then(Reactor& reactor, uint64_t offset, uint64_t length,
                     std::function<void()> cont);

  // Sub-blocks (kSubBlock bytes, or the granularity if smaller) whose cut
  // content was staged, and those recorded as zero at the cut (no staging bytes).
  uint32_t sub_block() const { return sub_; }
  uint64_t subs_staged() const { return staged_count_.load(); }
  uint64_t subs_zero() const { return zero_count_.load(); }
  // Bytes the staging file occupies on its filesystem (st_blocks).
  Result<uint64_t> staging_bytes() const;

  static constexpr uint32_t kSubBlock = 4096;

 private:
  class CowOp;
  class StageWrite;
  struct Waiter {
    Reactor* reactor;
    std::function<void()> resume;
  };
  // A sub-block's entry in subs_: not preserved, zero at the cut, or its log slot.
  static constexpr uint32_t kNotPreserved = UINT32_MAX;
  static constexpr uint32_t kZeroAtCut = UINT32_MAX - 1;
  static constexpr uint32_t kChunkSlots = 256;  // log slots per in-memory chunk

  explicit DiskSnapshot(Params p);
  void preserve_from(Reactor& reactor, uint64_t offset, uint64_t length, uint64_t block,
                     std::function<void()> cont);
  // Records sub-blocks [s0, s0 + n) of block b as read into buf (error: 0 or
  // an errno). Takes mu_; returns a staging write to start, if one is due.
  std::unique_ptr<StageWrite> preserved(Reactor& reactor, uint64_t block, uint32_t s0, uint32_t n,
                                        const char* buf, int error);
  std::unique_ptr<StageWrite> next_stage_write(Reactor& reactor);                   // mu_ held
  std::unique_ptr<StageWrite> staged(Reactor& reactor, uint64_t bytes, int error);  // one ended
  void break_locked(const std::string& why, int error);                             // mu_ held
  void release_busy(uint64_t block);  // mu_ held by caller: wakes waiters
  void wake_space_waiters();          // mu_ held
  // When (steady clock, ns) the guest was last seen submitting a request and
  // a write: samples Params::guest_ops/guest_writes, a move since the last
  // sample (by any copy thread) counting as now.
  struct GuestSeen {
    int64_t op_ns;
    int64_t write_ns;
  };
  GuestSeen watch_guest();
  void pace();                 // read_block: yield to the guest
  bool guest_busy_buffered();  // read_blocks: read through the page cache now

  Params p_;
  uint64_t nblocks_;
  uint32_t sub_;   // sub-block bytes
  uint32_t nsub_;  // sub-blocks per block
  UniqueFd staging_fd_;
  std::atomic<bool> finished_{false};
  std::atomic<bool> broken_{false};
  SparseBitmap copied_;     // read by the copier or fully preserved: writes may proceed
  SparseBitmap read_;       // read by the copier
  SparseBitmap preserved_;  // some of its cut content is in the log
  std::atomic<uint64_t> staged_count_{0};
  std::atomic<uint64_t> zero_count_{0};
  std::atomic<uint64_t> runs_buffered_{0};
  // watch_guest: the guest's counts last sampled, and when each last moved (ns).
  std::atomic<uint64_t> ops_seen_{0};
  std::atomic<uint64_t> writes_seen_{0};
  std::atomic<int64_t> op_seen_ns_{INT64_MIN / 2};
  std::atomic<int64_t> write_seen_ns_{INT64_MIN / 2};

  mutable std::mutex mu_;
  std::unordered_map<uint64_t, std::vector<Waiter>> busy_;  // block being preserved -> its waiters
  // block -> per sub-block kNotPreserved / kZeroAtCut / log slot; dropped once read.
  std::unordered_map<uint64_t, std::vector<uint32_t>> subs_;
  // The log: slot s at byte s * sub_ of the staging file; chunks not yet
  // fully written there stay in memory.
  std::unordered_map<uint64_t, std::shared_ptr<char[]>> chunks_;
  uint64_t slots_filled_ = 0;
  uint64_t flushed_bytes_ = 0;  // the log's prefix on the staging file
  bool stage_write_in_flight_ = false;
  std::condition_variable stage_cv_;   // stage_write_in_flight_ went false
  std::vector<Waiter> space_waiters_;  // preserving writes waiting for the log to drain
  std::string broken_reason_;
};

}  // namespace rpoint
