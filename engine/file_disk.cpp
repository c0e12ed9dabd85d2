#include "engine/file_disk.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <spdlog/spdlog.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "common/file_io.h"

namespace rpoint {
namespace {

// Progress of a request inside the engine (IoRequest::stage_).
enum Stage : uint32_t {
  kStageIo = 0,       // the main ring operation
  kStageFailed,       // a NOP carrying an error decided at submit time (in done_)
  kStageZeroWrite,    // write-zeroes fallback: writing zero buffers
  kStageSyncAfter,    // FUA on trim/zero: fdatasync after the fallocate
  kStageInlineWrite,  // a NOP carrying the result of a RWF_NOWAIT write (in inline_result_)
};

constexpr size_t kZeroBufSize = 1 << 20;
// Threads of a regular file's BlockingWorker (buffered writes, lseek). Two:
// with the batched hand-off, 2 beat 1 and 4 (ext4 takes the inode lock for
// every buffered write, so more threads only contend; one leaves no thread
// for lseek while a write sleeps). bench/RESULTS.md, 2026-12-01 14:25-14:35.
constexpr unsigned kWorkerThreads = 2;
alignas(4096) const char kZeros[kZeroBufSize] = {};

bool IsMutation(IoKind k) {
  return k == IoKind::kWrite || k == IoKind::kTrim || k == IoKind::kWriteZeroes;
}

bool Retryable(int res) { return res == -EAGAIN || res == -EINTR; }

// Where the rest of a read's or write's data is: an address, or with a fixed
// buffer an offset in it (integer arithmetic: `buf` may be nullptr + offset).
char* DataAt(const IoRequest& req) {
  return reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(req.buf) + req.done_);
}

}  // namespace

Result<std::shared_ptr<FileDisk>> FileDisk::Open(const FileDiskOptions& opts) {
  std::shared_ptr<FileDisk> d(new FileDisk(opts));
  int flags = (opts.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  d->fd_.reset(::open(opts.path.c_str(), flags));
  if (!d->fd_) return Status::FromErrno(errno, "open " + opts.path);
  struct stat st {};
  if (fstat(d->fd_.get(), &st) != 0) return Status::FromErrno(errno, "stat " + opts.path);
  uint64_t size = 0;
  if (S_ISBLK(st.st_mode)) {
    d->is_blockdev_ = true;
    if (ioctl(d->fd_.get(), BLKGETSIZE64, &size) != 0) {
      return Status::FromErrno(errno, "BLKGETSIZE64 " + opts.path);
    }
    int lbs = 512;
    if (ioctl(d->fd_.get(), BLKSSZGET, &lbs) == 0 && lbs > 0) d->logical_block_ = lbs;
  } else if (S_ISREG(st.st_mode)) {
    size = st.st_size;
    d->worker_ = std::make_unique<BlockingWorker>("bw-" + opts.name, kWorkerThreads);
    // 4096 satisfies O_DIRECT on every local filesystem and device in use today.
    d->logical_block_ = 4096;
  } else {
    return Status::InvalidArgument(opts.path + " is neither a regular file nor a block device");
  }
  d->size_.store(size);
  if (!opts.tracking_dir.empty() && !opts.read_only) {
    auto t = ChangeTracker::Open({opts.tracking_dir, opts.tracking_granularity, size});
    if (!t.ok()) return t.status();
    d->tracker_ = std::move(t).value();
  }
  if (opts.direct) {
    d->direct_fd_.reset(::open(opts.path.c_str(), flags | O_DIRECT));
    if (!d->direct_fd_) {
      // tmpfs and some FUSE filesystems refuse O_DIRECT: serve buffered rather than fail.
      spdlog::warn("disk {}: O_DIRECT unavailable on {} ({}), using buffered I/O", opts.name,
                   opts.path, std::strerror(errno));
    }
  }
  return d;
}

DeviceCaps FileDisk::caps() const {
  DeviceCaps c;
  c.read_only = opts_.read_only;
  c.can_flush = true;
  c.can_trim = !opts_.read_only;
  c.can_zero = !opts_.read_only;
  c.can_fast_zero = !opts_.read_only && zero_range_ok_.load();
  c.can_cache = true;
  c.fixed_buffers = true;   // READ_FIXED / WRITE_FIXED, never a copy in user memory
  c.can_multi_conn = true;  // FLUSH is fdatasync of the one shared file
  c.min_block = 1;          // unaligned requests go through the buffered descriptor
  c.preferred_block = 4096;
  return c;
}

int FileDisk::fd_for(const IoRequest& req) const {
  if (!direct_fd_ || req.buffered_) return fd_.get();
  uint64_t a = logical_block_ - 1;
  uint64_t off = req.offset + req.done_;
  uint64_t len = req.length - req.done_;
  const char* buf = req.kind == IoKind::kWriteZeroes ? kZeros : DataAt(req);
  if ((off & a) || (len & a) || (reinterpret_cast<uintptr_t>(buf) & a)) return fd_.get();
  return direct_fd_.get();
}

void FileDisk::submit(Reactor& reactor, IoRequest& req) {
  req.device_ = this;
  req.reactor_ = &reactor;
  req.done_ = 0;
  req.stage_ = kStageIo;
  req.buffered_ = false;
  guest_ops_.fetch_add(1, std::memory_order_relaxed);  // a copy-out yields while this moves
  if (IsMutation(req.kind)) guest_writes_.fetch_add(1, std::memory_order_relaxed);
  int err = 0;
  if (req.kind != IoKind::kFlush && !check_range(req.offset, req.length).ok()) {
    err = EINVAL;
  } else if (IsMutation(req.kind) && opts_.read_only) {
    err = EPERM;
  } else if (retired()) {
    err = ESHUTDOWN;
  }
  if (err != 0) {
    // Completion must never run inside submit(): report through the ring.
    req.stage_ = kStageFailed;
    req.done_ = err;
    io_uring_prep_nop(reactor.sqe(&req));
    return;
  }
  if (IsMutation(req.kind)) {
    start_mutation(reactor, req);
  } else {
    issue(reactor, req);
  }
}

void FileDisk::start_mutation(Reactor& reactor, IoRequest& req) {
  // The one place every write, trim and zero passes: the blocks' dirty bits are
  // durable before the data write is issued.
  // The epoch ticket is the write's side of a cut: a cut publishes the next
  // epoch of all its disks with one store (engine/cut.h), and the snapshot is
  // installed before, so a write that reads the new epoch also finds the
  // snapshot it must preserve blocks for (after_marked).
  if (!tracker_ || req.length == 0) return after_marked(reactor, req);
  req.epoch_ = tracker_->enter();
  req.entered_ = true;
  bool ready = tracker_->ensure_marked(req.offset, req.length, reactor, [this, &reactor, &req](Status st) {
    if (!st.ok()) return finish(reactor, req, -EIO);  // never write what we could not track
    after_marked(reactor, req);
  });
  if (ready) after_marked(reactor, req);
}

void FileDisk::after_marked(Reactor& reactor, IoRequest& req) {
  // A write that entered after a cut preserves the blocks the restore point has
  // not copied yet before it changes them.
  if (req.entered_) {
    std::shared_ptr<DiskSnapshot> snap = snapshot_.load(std::memory_order_acquire);
    if (snap && req.epoch_ > snap->generation()) {
      return snap->preserve_then(reactor, req.offset, req.length,
                                 [this, &reactor, &req] { issue(reactor, req); });
    }
  }
  issue(reactor, req);
}

Result<std::shared_ptr<DiskSnapshot>> FileDisk::arm_cut(
    std::shared_ptr<const CutSwitch> sw, UniqueFd staging_fd, bool force_full,
    std::shared_ptr<const SparseBitmap> also_copy, uint64_t since) {
  if (!tracker_) return Status::Unsupported("disk " + name() + " is not change-tracked");
  if (snapshot_.load()) return Status::Conflict("disk " + name() + " already has a restore point in progress");
  bool full = force_full || tracker_->all_since_creation();
  auto armed = tracker_->arm(std::move(sw), since);
  if (!armed.ok()) return armed.status();
  if (!full && !armed.value().history_gap.empty()) {
    // The base is older than what the tracker retired (metadata.db put back
    // from a copy, or its -wal lost): an incremental point would miss the
    // changes of the retired generations.
    spdlog::warn(
        "disk {}: the tracking history after the restore point's base (generation {}) is not "
        "whole: {}; metadata.db older than the change tracker? This point is full",
        name(), since, armed.value().history_gap);
    full = true;
  }
  DiskSnapshot::Params p{
      name(),
      fd_.get(),
      armed.value().frozen,
      size(),
      tracker_->granularity(),
      full,
      full ? std::vector<std::shared_ptr<const SparseBitmap>>{} : std::move(armed.value().bitmaps)};
  p.guest_ops = &guest_ops_;
  p.guest_writes = &guest_writes_;
  p.guest_direct = direct();
  // The snapshot treats every frozen bitmap alike (to_copy, copy-before-write).
  if (!full && also_copy) p.frozen.push_back(std::move(also_copy));
  auto snap = DiskSnapshot::Create(std::move(p), std::move(staging_fd));
  if (!snap.ok()) {
    tracker_->disarm();
    return snap.status();
  }
  // Installed before the switch is published: no write preserves for it yet
  // (every write still has an epoch <= its generation), and every write that
  // sees the new epoch finds it.
  snapshot_.store(snap.value(), std::memory_order_seq_cst);
  return snap;
}

void FileDisk::settle_cut() {
  if (tracker_) tracker_->settle();
}

void FileDisk::abort_cut() {
  if (tracker_) tracker_->disarm();
  end_snapshot();
}

void FileDisk::end_snapshot() {
  std::shared_ptr<DiskSnapshot> snap = snapshot_.exchange(nullptr);
  if (snap) snap->finish();
}

void FileDisk::issue(Reactor& reactor, IoRequest& req) {
  uint64_t off = req.offset + req.done_;
  uint64_t left = req.length - req.done_;
  switch (req.kind) {
    case IoKind::kRead: {
      auto len = static_cast<unsigned>(std::min<uint64_t>(left, 1u << 30));
      if (req.fixed_buf >= 0) {
        // A registered buffer (a ublk request's pages): `buf` is the offset in it.
        io_uring_prep_read_fixed(reactor.sqe(&req), fd_for(req), DataAt(req), len, off,
                                 req.fixed_buf);
        return;
      }
      io_uring_prep_read(reactor.sqe(&req), fd_for(req), req.buf + req.done_, len, off);
      return;
    }
    case IoKind::kWrite: {
      // A fixed buffer's data is not in user memory: pwrite on the worker
      // cannot reach it, so its buffered writes go through the ring as well
      // (io_uring punts one that would block to its io-wq).
      if (worker_ && !(req.flags & kIoFua) && req.fixed_buf < 0 && fd_for(req) == fd_.get()) {
        return issue_buffered_write(reactor, req);
      }
      io_uring_sqe* s = reactor.sqe(&req);
      auto len = static_cast<unsigned>(std::min<uint64_t>(left, 1u << 30));
      if (req.fixed_buf >= 0) {
        io_uring_prep_write_fixed(s, fd_for(req), DataAt(req), len, off, req.fixed_buf);
      } else {
        io_uring_prep_write(s, fd_for(req), req.buf + req.done_, len, off);
      }
      if (req.flags & kIoFua) s->rw_flags = RWF_DSYNC;
      return;
    }
    case IoKind::kFlush:
      io_uring_prep_fsync(reactor.sqe(&req), fd_.get(), IORING_FSYNC_DATASYNC);
      return;
    case IoKind::kTrim:
      if (req.length == 0) break;
      io_uring_prep_fallocate(reactor.sqe(&req), fd_.get(),
                              FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, req.offset, req.length);
      return;
    case IoKind::kWriteZeroes: {
      if (req.length == 0) break;
      if (req.stage_ == kStageZeroWrite) {
        io_uring_prep_write(reactor.sqe(&req), fd_for(req), kZeros,
                            static_cast<unsigned>(std::min<uint64_t>(left, kZeroBufSize)), off);
        return;
      }
      int mode = (req.flags & kIoNoHole) ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE;
      io_uring_prep_fallocate(reactor.sqe(&req), fd_.get(), mode | FALLOC_FL_KEEP_SIZE,
                              req.offset, req.length);
      return;
    }
    case IoKind::kCache:
      if (req.length == 0) break;
      io_uring_prep_fadvise(reactor.sqe(&req), fd_.get(), req.offset,
                            static_cast<off_t>(req.length), POSIX_FADV_WILLNEED);
      return;
    case IoKind::kBlockStatus:
      // lseek(SEEK_DATA) takes the inode lock a buffered writer holds, maybe
      // for as long as dirty throttling keeps it: off the reactor.
      if (worker_) return worker_->submit(reactor, req, [this, &req] { return fill_extents(req); });
      req.stage_ = kStageFailed;
      req.done_ = static_cast<uint64_t>(-fill_extents(req));  // a block device: no syscall
      io_uring_prep_nop(reactor.sqe(&req));
      return;
  }
  // Nothing to do (zero length): still complete through the ring.
  req.stage_ = kStageFailed;
  req.done_ = 0;
  io_uring_prep_nop(reactor.sqe(&req));
}

void FileDisk::issue_buffered_write(Reactor& reactor, IoRequest& req) {
  // A buffered write copies into the page cache and may sleep there (dirty
  // throttling, the journal, page faults). Filesystems that support
  // RWF_NOWAIT for buffered writes do it inline when it cannot block; ext4
  // refuses (EOPNOTSUPP), and io_uring would punt each write to an io-wq
  // worker that runs writes to one inode one at a time and hands each back
  // separately (0.65x nbdkit-file at 4k, bench/RESULTS.md). The disk's
  // BlockingWorker does the same copy with batched hand-offs instead.
  if (try_nowait_.load(std::memory_order_relaxed)) {
    int res = buffered_pwrite(req, RWF_NOWAIT);
    if (res != -EAGAIN && res != -EOPNOTSUPP) {
      req.inline_result_ = res;
      req.stage_ = kStageInlineWrite;
      io_uring_prep_nop(reactor.sqe(&req));
      return;
    }
    if (res == -EOPNOTSUPP) try_nowait_.store(false, std::memory_order_relaxed);
  }
  // Two pointers: the std::function holds them without allocating.
  worker_->submit(reactor, req, [this, &req] { return buffered_pwrite(req, 0); });
}

int FileDisk::buffered_pwrite(IoRequest& req, int rwf_flags) {
  iovec iov{req.buf + req.done_,
            static_cast<size_t>(std::min<uint64_t>(req.length - req.done_, 1u << 30))};
  ssize_t n = ::pwritev2(fd_.get(), &iov, 1, static_cast<off_t>(req.offset + req.done_), rwf_flags);
  return n < 0 ? -errno : static_cast<int>(n);
}

int FileDisk::fill_extents(IoRequest& req) {
  req.extents.clear();
  auto ext = block_status(req.offset, req.length, req.max_extents);
  if (!ext.ok()) {
    spdlog::debug("disk {}: block status: {}", name(), ext.status().ToString());
    return -EIO;
  }
  req.extents = std::move(ext).value();
  // Further contexts (rpoint:changed: from the change tracker), here on the
  // disk's worker thread like the lseek above, never on the reactor.
  req.context_extents.clear();
  if (req.contexts) {
    for (const auto& ctx : *req.contexts) {
      auto m = ctx->extents(req.offset, req.length, req.max_extents);
      if (!m.ok()) {
        spdlog::warn("disk {}: {}: {}", name(), ctx->name(), m.status().ToString());
        return -EIO;
      }
      req.context_extents.push_back(std::move(m).value());
    }
  }
  return 0;
}

void FileDisk::on_completion(Reactor& reactor, IoRequest& req, int res) {
  if (req.stage_ == kStageFailed) return finish(reactor, req, -static_cast<int>(req.done_));
  if (req.stage_ == kStageInlineWrite) {
    req.stage_ = kStageIo;
    res = req.inline_result_;
  }
  if (Retryable(res)) return issue(reactor, req);

  if (req.stage_ == kStageSyncAfter) return finish(reactor, req, res < 0 ? res : 0);

  switch (req.kind) {
    case IoKind::kRead:
    case IoKind::kWrite:
      if (res == -EINVAL && req.fixed_buf >= 0 && !req.buffered_ && fd_for(req) != fd_.get()) {
        // O_DIRECT wants the memory aligned too; a registered buffer's pages
        // are whatever the request brought. The buffered descriptor takes any.
        req.buffered_ = true;
        return issue(reactor, req);
      }
      if (res < 0) return finish(reactor, req, res);
      if (res == 0) {
        // The backing file ended early: it was truncated behind our back.
        spdlog::error("disk {}: short {} at offset {}", name(),
                      req.kind == IoKind::kRead ? "read" : "write", req.offset + req.done_);
        return finish(reactor, req, -EIO);
      }
      req.done_ += static_cast<uint64_t>(res);
      if (req.done_ < req.length) return issue(reactor, req);
      return finish(reactor, req, 0);
    case IoKind::kFlush:
    case IoKind::kBlockStatus:
      return finish(reactor, req, res < 0 ? res : 0);
    case IoKind::kCache:
      // Read-ahead is advisory: a filesystem that cannot do it has still served the request.
      return finish(reactor, req, 0);
    case IoKind::kTrim:
      // Trim is advisory too: where punching holes is unsupported the data simply stays.
      if (res < 0 && res != -EOPNOTSUPP) return finish(reactor, req, res);
      break;
    case IoKind::kWriteZeroes:
      if (req.stage_ == kStageZeroWrite) {
        if (res < 0) return finish(reactor, req, res);
        if (res == 0) return finish(reactor, req, -EIO);
        req.done_ += static_cast<uint64_t>(res);
        if (req.done_ < req.length) return issue(reactor, req);
        break;
      }
      if (res == -EOPNOTSUPP || res == -EINVAL) {
        if (req.flags & kIoFastZero) return finish(reactor, req, -EOPNOTSUPP);
        if (!(req.flags & kIoNoHole)) {
          // No hole punching here; an explicit zero range may still work.
          req.flags |= kIoNoHole;
          return issue(reactor, req);
        }
        zero_range_ok_.store(false);
        req.stage_ = kStageZeroWrite;
        req.done_ = 0;
        return issue(reactor, req);
      }
      if (res < 0) return finish(reactor, req, res);
      break;
  }
  // trim / write-zeroes done; FUA makes the new allocation state durable first.
  if (req.flags & kIoFua) {
    req.stage_ = kStageSyncAfter;
    io_uring_prep_fsync(reactor.sqe(&req), fd_.get(), IORING_FSYNC_DATASYNC);
    return;
  }
  finish(reactor, req, 0);
}

void FileDisk::finish(Reactor& reactor, IoRequest& req, int result) {
  if (result > 0) result = 0;
  if (req.entered_) {
    // A mutation that entered before a cut may have landed after the copier read
    // its blocks: before it is acknowledged (and before its old epoch may be
    // retired), the generation active now records it too. A failed one as well:
    // part of it may have landed before the error. If another cut comes while
    // that mark is being written, mark again in the newer generation.
    uint64_t now = tracker_->epoch();
    if (req.epoch_ != now) {
      bool ready = tracker_->ensure_marked(
          req.offset, req.length, reactor, [this, &reactor, &req, now, result](Status st) {
            if (st.ok() && tracker_->epoch() != now) return finish(reactor, req, result);
            complete_mutation(req, !st.ok() && result == 0 ? -EIO : result);
          });
      if (!ready) return;
      if (tracker_->epoch() != now) return finish(reactor, req, result);
    }
  }
  complete_mutation(req, result);
}

void FileDisk::complete_mutation(IoRequest& req, int result) {
  if (req.entered_) {
    req.entered_ = false;
    tracker_->leave(req.epoch_);
  }
  req.on_done(result);
}

Result<std::vector<Extent>> FileDisk::block_status(uint64_t offset, uint64_t length,
                                                   size_t max_extents) {
  Status range = check_range(offset, length);
  if (!range.ok()) return range;
  std::vector<Extent> out;
  uint64_t end = offset + length;
  if (length == 0 || max_extents == 0) return out;
  if (is_blockdev_) {
    out.push_back({length, 0});
    return out;
  }
  uint64_t pos = offset;
  while (pos < end && out.size() < max_extents) {
    auto data = SeekData(fd_.get(), pos, opts_.path);
    if (!data.ok()) return data.status();
    if (data.value() == kNoData) {  // no data after pos: the rest is a hole
      out.push_back({end - pos, Extent::kHole | Extent::kZero});
      break;
    }
    uint64_t d = data.value();
    if (d > pos) {
      uint64_t hole_end = std::min(d, end);
      out.push_back({hole_end - pos, Extent::kHole | Extent::kZero});
      pos = hole_end;
      continue;
    }
    off_t hole = lseek(fd_.get(), static_cast<off_t>(pos), SEEK_HOLE);
    if (hole < 0) return Status::FromErrno(errno, "lseek SEEK_HOLE " + opts_.path);
    uint64_t data_end = std::min(static_cast<uint64_t>(hole), end);
    if (data_end <= pos) data_end = end;  // defensive: never loop without progress
    out.push_back({data_end - pos, 0});
    pos = data_end;
  }
  return out;
}

Status FileDisk::grow(uint64_t new_size) {
  static std::mutex grow_mu;  // resizes are rare; serialise them simply
  std::lock_guard<std::mutex> lock(grow_mu);
  if (is_blockdev_) {
    uint64_t sz = 0;
    if (ioctl(fd_.get(), BLKGETSIZE64, &sz) != 0) return Status::FromErrno(errno, "BLKGETSIZE64");
    if (sz < new_size) {
      return Status::Unsupported("block device " + opts_.path + " is " + std::to_string(sz) +
                                 " bytes; grow the device itself first");
    }
    if (tracker_) {
      Status st = tracker_->grow(sz);
      if (!st.ok()) return st;
    }
    size_.store(sz);
    return Status::Ok();
  }
  const uint64_t old_size = size_.load();
  if (new_size < old_size) return Status::InvalidArgument("disks can only grow");
  // A grow that fails leaves the file as it was: a file larger than its
  // disk's row or its tracking would make the restart take the new size
  // against a tracker that never allocated it (the disk Unavailable). No
  // client can have written past old_size (size_ did not move yet).
  auto undo = [&](Status failed) {
    if (ftruncate(fd_.get(), static_cast<off_t>(old_size)) != 0 || fsync(fd_.get()) != 0) {
      spdlog::error("disk {}: a failed grow could not be undone (the file stays at {} bytes): {}",
                    name(), new_size, std::strerror(errno));
    }
    return failed;
  };
  if (ftruncate(fd_.get(), static_cast<off_t>(new_size)) != 0) {
    return undo(Status::FromErrno(errno, "ftruncate " + opts_.path));
  }
  if (fsync(fd_.get()) != 0) return undo(Status::FromErrno(errno, "fsync " + opts_.path));
  // Tracking covers the new blocks before any client can address them.
  if (tracker_) {
    Status st = tracker_->grow(new_size);
    if (!st.ok()) return undo(st);
  }
  size_.store(new_size);
  return Status::Ok();
}

Status FileDisk::sync() {
  if (opts_.read_only) return Status::Ok();
  if (fdatasync(fd_.get()) != 0) return Status::FromErrno(errno, "fdatasync " + opts_.path);
  return Status::Ok();
}

}  // namespace rpoint
