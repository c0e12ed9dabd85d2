// FileDisk: a managed disk backed by a regular file or a block device, on io_uring.
//
// Reads and writes go through the submitting reactor's ring. With O_DIRECT on,
// requests whose offset, length and buffer are aligned to the device's logical
// block use the O_DIRECT descriptor; the rest use a buffered descriptor of the
// same file (Linux keeps the two coherent), so unaligned clients just work.
// FUA writes carry RWF_DSYNC; FLUSH is fdatasync. Trim punches holes, write
// zeroes uses fallocate(ZERO_RANGE / PUNCH_HOLE), falling back to writing
// zeroes where the filesystem cannot. Buffered writes to a regular file and
// block status (lseek) may block in the kernel, so they run on the disk's
// BlockingWorker, never on a reactor thread (see FileDisk::issue).
//
// Every mutating request passes through one point (start_mutation) so change
// tracking can make its dirty bits durable before the data write is issued;
// there it takes its epoch ticket, which says on which side of a restore
// point's cut it is (no gate: a cut never holds a write, engine/cut.h).
//
// Thread-safety: as BlockDevice. grow() is safe from any thread.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "engine/block_device.h"
#include "engine/blocking_worker.h"
#include "engine/change_tracker.h"
#include "engine/disk_snapshot.h"

namespace rpoint {

struct FileDiskOptions {
  std::string name;
  std::string path;
  bool read_only = false;
  bool direct = false;  // O_DIRECT for aligned requests
  // Change tracking: the directory of this disk's bitmap generations (empty: no
  // tracking, e.g. read-only exports) and its granularity.
  std::string tracking_dir;
  uint32_t tracking_granularity = 64 * 1024;
};

class FileDisk final : public BlockDevice, public std::enable_shared_from_this<FileDisk> {
 public:
  static Result<std::shared_ptr<FileDisk>> Open(const FileDiskOptions& opts);

  const std::string& name() const override { return opts_.name; }
  const std::string& path() const { return opts_.path; }
  uint64_t size() const override { return size_.load(); }
  DeviceCaps caps() const override;
  bool is_block_device() const { return is_blockdev_; }
  bool direct() const { return direct_fd_.valid(); }

  void submit(Reactor& reactor, IoRequest& req) override;
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length,
                                           size_t max_extents) override;
  void on_completion(Reactor& reactor, IoRequest& req, int res) override;

  // Grows a file-backed disk to new_size (never shrinks). Block devices: re-reads their size.
  Status grow(uint64_t new_size);
  // fdatasync, synchronously (shutdown, tests).
  Status sync();
  // nullptr when the disk is not tracked.
  ChangeTracker* tracker() const { return tracker_.get(); }

  // ---- restore point cuts (see engine/cut.h; control-plane threads) ----
  // Step 1 of a cut: arms the tracker's flip on `sw` and installs the snapshot
  // of the generation it freezes. Writes go on in the old epoch (no
  // copy-before-write) until sw is published; from then on every write
  // submitted preserves what the point still needs first. One snapshot at a
  // time per disk. force_full: the point stores every
  // allocated block even when the tracker has retired generations (the
  // caller has no usable base point: a new collection, a disk new to the VM,
  // the base point deleted). The frozen generations are kept either way and
  // retired by the caller once the point succeeded. also_copy (incremental
  // only): blocks to copy as if changed, e.g. those whose copy in the base
  // point was found damaged; known before the cut, so copy-before-write
  // protects them from the cut on like any changed block.
  // since: the generation the point's base captured through (its collection's
  // previous point); an incremental point copies the generations after it.
  // When the tracker no longer holds every generation after it (retired past
  // it: metadata.db older than the tracker), the point is full (a warning).
  Result<std::shared_ptr<DiskSnapshot>> arm_cut(
      std::shared_ptr<const CutSwitch> sw, UniqueFd staging_fd, bool force_full = false,
      std::shared_ptr<const SparseBitmap> also_copy = nullptr, uint64_t since = 0);
  // Step 3, after sw was published: the flip becomes permanent (no I/O, no failure).
  void settle_cut();
  // A cut that failed before its switch was published: disarms and drops the snapshot.
  void abort_cut();
  // The restore point is done with the snapshot (succeeded or failed).
  void end_snapshot();
  std::shared_ptr<DiskSnapshot> snapshot() const { return snapshot_.load(); }

 private:
  explicit FileDisk(FileDiskOptions opts) : opts_(std::move(opts)) {}
  void start(Reactor& reactor, IoRequest& req);
  void start_mutation(Reactor& reactor, IoRequest& req);
  void issue(Reactor& reactor, IoRequest& req);
  void after_marked(Reactor& reactor, IoRequest& req);
  void finish(Reactor& reactor, IoRequest& req, int result);
  void complete_mutation(IoRequest& req, int result);
  int fd_for(const IoRequest& req) const;
  void issue_buffered_write(Reactor& reactor, IoRequest& req);
  int buffered_pwrite(IoRequest& req, int rwf_flags);  // bytes or -errno
  int fill_extents(IoRequest& req);

  FileDiskOptions opts_;
  UniqueFd fd_;         // buffered
  UniqueFd direct_fd_;  // O_DIRECT, when enabled
  bool is_blockdev_ = false;
  uint32_t logical_block_ = 512;
  bool punch_ok_ = true;
  // Regular files: runs buffered writes and lseek off the reactors (FileDisk::issue).
  std::unique_ptr<BlockingWorker> worker_;
  // Buffered writes may be tried inline with RWF_NOWAIT until the filesystem
  // refuses (ext4: EOPNOTSUPP); then they all go to worker_.
  std::atomic<bool> try_nowait_{true};
  std::atomic<bool> zero_range_ok_{true};
  std::atomic<uint64_t> size_{0};
  std::unique_ptr<ChangeTracker> tracker_;

  std::atomic<std::shared_ptr<DiskSnapshot>> snapshot_;
  std::atomic<uint64_t> guest_ops_{0};  // requests submitted: the copier yields while it moves
  // Writes, trims and zeroes submitted: the copier reads buffered while it moves.
  std::atomic<uint64_t> guest_writes_{0};
};

}  // namespace rpoint
