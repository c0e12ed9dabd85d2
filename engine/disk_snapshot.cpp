#include "engine/disk_snapshot.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/fault_injection.h"

namespace rpoint {
namespace {

bool AllZero(const char* p, size_t n) {
  // n is a multiple of 8 except for a disk's partial last block.
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w != 0) return false;
  }
  for (; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace

// Preserves one block: read the old content from the disk, write it to the
// staging file, then continue the write that asked for it. Owns itself while
// its ring operations are in flight.
class DiskSnapshot::CowOp final : public Reactor::Op {
 public:
  CowOp(std::shared_ptr<DiskSnapshot> snap, Reactor& reactor, uint64_t block,
        std::function<void()> then)
      : snap_(std::move(snap)),
        reactor_(reactor),
        block_(block),
        then_(std::move(then)),
        buf_(static_cast<char*>(std::aligned_alloc(4096, snap_->granularity())), &std::free) {
    uint64_t off = block * snap_->granularity();
    len_ = static_cast<uint32_t>(std::min<uint64_t>(snap_->granularity(), snap_->size() - off));
  }

  static void Start(std::unique_ptr<CowOp> op) { op.release()->issue(); }

  void complete(int res, uint32_t) override {
    std::unique_ptr<CowOp> self(this);  // freed unless handed back to the ring
    if (injected_) res = -std::exchange(injected_, 0);
    if (res == -EAGAIN || res == -EINTR) return self.release()->issue();
    if (res < 0) return done(std::move(self), -res, false);
    if (res == 0 && !writing_) {
      std::memset(buf_.get() + done_, 0, len_ - done_);  // past EOF reads as zeroes
      res = static_cast<int>(len_ - done_);
    }
    if (res == 0) return done(std::move(self), EIO, false);
    done_ += static_cast<uint32_t>(res);
    if (done_ < len_) return self.release()->issue();
    if (!writing_) {
      // Zeroes at the cut (a hole, an unallocated or zeroed block): a bit in a
      // bitmap says it all; staging bytes are for real data only.
      if (AllZero(buf_.get(), len_)) return done(std::move(self), 0, true);
      writing_ = true;
      done_ = 0;
      return self.release()->issue();
    }
    done(std::move(self), 0, false);
  }

 private:
  void issue() {
    uint64_t off = block_ * snap_->granularity() + done_;
    io_uring_sqe* s = reactor_.sqe(this);
    if (writing_) {
      // An injected fault completes a no-op with the error (or writes fewer bytes).
      ssize_t n = fault::WriteLength("staging.write", len_ - done_);
      if (n < 0) {
        injected_ = static_cast<int>(-n);
        io_uring_prep_nop(s);
      } else {
        io_uring_prep_write(s, snap_->staging_fd_.get(), buf_.get() + done_, unsigned(n), off);
      }
    } else {
      io_uring_prep_read(s, snap_->p_.data_fd, buf_.get() + done_, len_ - done_, off);
    }
  }
  static void done(std::unique_ptr<CowOp> self, int error, bool zero) {
    self->snap_->preserved(self->block_, error, zero);
    auto then = std::move(self->then_);
    self.reset();
    then();
  }

  std::shared_ptr<DiskSnapshot> snap_;
  Reactor& reactor_;
  uint64_t block_;
  std::function<void()> then_;
  std::unique_ptr<char, decltype(&std::free)> buf_;
  uint32_t len_ = 0;
  uint32_t done_ = 0;
  bool writing_ = false;
  int injected_ = 0;  // errno of an injected staging write fault
};

DiskSnapshot::DiskSnapshot(Params p)
    : p_(std::move(p)),
      nblocks_((p_.size + p_.granularity - 1) / p_.granularity),
      copied_(nblocks_),
      preserved_(nblocks_),
      zero_(nblocks_) {}

Result<std::shared_ptr<DiskSnapshot>> DiskSnapshot::Create(Params params, UniqueFd staging_fd) {
  if (!staging_fd) return Status::InvalidArgument("no staging file");
  std::shared_ptr<DiskSnapshot> s(new DiskSnapshot(std::move(params)));
  s->staging_fd_ = std::move(staging_fd);
  return s;
}

DiskSnapshot::~DiskSnapshot() { finish(); }

bool DiskSnapshot::needs_preserve(uint64_t block) const {
  if (finished_.load(std::memory_order_acquire) || block >= nblocks_) return false;
  // A broken snapshot fails its point: later writes need not pay for staging.
  if (broken_.load(std::memory_order_acquire)) return false;
  if (copied_.test(block)) return false;
  if (p_.full) return true;
  for (const auto& f : p_.frozen) {
    if (f->test(block)) return true;
  }
  return false;
}

void DiskSnapshot::preserve_then(Reactor& reactor, uint64_t first, uint64_t last,
                                 std::function<void()> cont) {
  for (uint64_t b = first; b <= last; ++b) {
    if (!needs_preserve(b)) continue;
    std::unique_lock<std::mutex> lock(mu_);
    if (copied_.test(b)) continue;
    auto again = [self = shared_from_this(), &reactor, b, last, cont]() mutable {
      self->preserve_then(reactor, b, last, std::move(cont));
    };
    auto it = busy_.find(b);
    if (it != busy_.end()) {
      // The copier (or another write) is on this block: retry when it is done.
      it->second.push_back({&reactor, std::move(again)});
      return;
    }
    busy_.emplace(b, std::vector<Waiter>{});
    lock.unlock();
    auto next = [self = shared_from_this(), &reactor, b, last, cont]() mutable {
      self->preserve_then(reactor, b + 1, last, std::move(cont));
    };
    CowOp::Start(std::make_unique<CowOp>(shared_from_this(), reactor, b, std::move(next)));
    return;
  }
  cont();
}

void DiskSnapshot::release_busy(uint64_t block) {
  auto it = busy_.find(block);
  if (it == busy_.end()) return;
  for (Waiter& w : it->second) w.reactor->post(std::move(w.resume));
  busy_.erase(it);
  cv_.notify_all();
}

void DiskSnapshot::preserved(uint64_t block, int error, bool zero) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error != 0) {
    if (!broken_.exchange(true)) {
      broken_reason_ = "copy-before-write of block " + std::to_string(block) +
                       " to staging_dir failed: " + std::strerror(error) +
                       (error == ENOSPC ? " (staging_dir is full)" : "");
      spdlog::error("disk {}: {}; the restore point fails, guest writes go on", p_.disk_name,
                    broken_reason_);
    }
  } else if (zero) {
    zero_.set(block);
    zero_count_.fetch_add(1);
  } else {
    preserved_.set(block);
    preserved_count_.fetch_add(1);
  }
  copied_.set(block);  // either way, later writes to it go straight through
  release_busy(block);
}

Status DiskSnapshot::read_block(uint64_t block, char* buf) {
  if (block >= nblocks_) return Status::OutOfRange("block beyond the snapshot");
  uint64_t off = block * p_.granularity;
  uint64_t len = std::min<uint64_t>(p_.granularity, p_.size - off);
  int fd = -1;
  {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (broken_.load()) return Status::IoError(broken_reason_);
      if (zero_.test(block)) {
        std::memset(buf, 0, p_.granularity);
        return Status::Ok();
      }
      if (preserved_.test(block)) {
        fd = staging_fd_.get();
        break;
      }
      if (busy_.count(block)) {
        cv_.wait(lock);
        continue;
      }
      if (copied_.test(block)) {
        return Status::Internal("block " + std::to_string(block) + " of the snapshot read twice");
      }
      busy_.emplace(block, std::vector<Waiter>{});
      fd = p_.data_fd;
      break;
    }
  }
  Status st;
  uint64_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      st = Status::FromErrno(errno, "read snapshot block");
      break;
    }
    if (n == 0) {
      std::memset(buf + done, 0, len - done);
      break;
    }
    done += static_cast<uint64_t>(n);
  }
  if (len < p_.granularity) std::memset(buf + len, 0, p_.granularity - len);
  if (fd == p_.data_fd) {
    std::lock_guard<std::mutex> lock(mu_);
    copied_.set(block);
    release_busy(block);
  }
  return st;
}

Result<SparseBitmap> DiskSnapshot::to_copy() {
  SparseBitmap out(nblocks_);
  if (!p_.full) {
    for (const auto& f : p_.frozen) out.merge(*f);
    return out;
  }
  // Every block allocated at the cut. A block allocated then and written since
  // was preserved first (into staging, or as zero), so allocation now plus the
  // preserved blocks covers the cut's allocation. A block that was zero at the
  // cut reads as zeroes (read_block) and the store keeps it as a hole.
  uint64_t pos = 0;
  while (pos < p_.size) {
    off_t data = lseek(p_.data_fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      if (errno == EINVAL || errno == EOPNOTSUPP) {  // no hole support: all data
        out.set_all();
        break;
      }
      return Status::FromErrno(errno, "lseek SEEK_DATA");
    }
    off_t hole = lseek(p_.data_fd, data, SEEK_HOLE);
    if (hole < 0) return Status::FromErrno(errno, "lseek SEEK_HOLE");
    uint64_t end = std::min<uint64_t>(static_cast<uint64_t>(hole), p_.size);
    if (static_cast<uint64_t>(data) >= end) break;
    out.set_range(static_cast<uint64_t>(data) / p_.granularity, (end - 1) / p_.granularity);
    pos = end;
  }
  std::lock_guard<std::mutex> lock(mu_);
  out.merge(preserved_);
  return out;
}

void DiskSnapshot::finish() {
  finished_.store(true, std::memory_order_release);
}

Result<uint64_t> DiskSnapshot::staging_bytes() const {
  struct stat st {};
  if (fstat(staging_fd_.get(), &st) != 0) return Status::FromErrno(errno, "fstat staging file");
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

std::string DiskSnapshot::broken_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return broken_reason_;
}

}  // namespace rpoint
