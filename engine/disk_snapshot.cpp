#include "engine/disk_snapshot.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <thread>

#include "common/fault_injection.h"
#include "common/file_io.h"

namespace rpoint {
namespace {

bool AllZero(const char* p, size_t n) {
  // n is a multiple of 8 except for a disk's partial last sub-block.
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

using AlignedBuf = std::unique_ptr<char, decltype(&std::free)>;

AlignedBuf AllocAligned(size_t n) {
  return AlignedBuf(static_cast<char*>(std::aligned_alloc(4096, (n + 4095) & ~size_t{4095})),
                    &std::free);
}

}  // namespace

// Writes one run of the log (inside one chunk) to the staging file. One is in
// flight per snapshot at a time; whatever the log gained meanwhile goes in the
// next, so under load each staging write carries many sub-blocks.
class DiskSnapshot::StageWrite final : public Reactor::Op {
 public:
  StageWrite(std::shared_ptr<DiskSnapshot> snap, Reactor& reactor, std::shared_ptr<char[]> chunk,
             const char* data, uint64_t off, uint32_t len)
      : snap_(std::move(snap)),
        reactor_(reactor),
        chunk_(std::move(chunk)),
        data_(data),
        off_(off),
        len_(len) {}

  static void Start(std::unique_ptr<StageWrite> op) { op.release()->issue(); }

  void complete(int res, uint32_t) override {
    std::unique_ptr<StageWrite> self(this);
    if (injected_) res = -std::exchange(injected_, 0);
    if (res == -EAGAIN || res == -EINTR) return self.release()->issue();
    if (res == 0) res = -EIO;
    if (res < 0) return end(std::move(self), -res);
    done_ += static_cast<uint32_t>(res);
    if (done_ < len_) return self.release()->issue();
    end(std::move(self), 0);
  }

 private:
  void issue() {
    io_uring_sqe* s = reactor_.sqe(this);
    // An injected fault completes a no-op with the error (or writes fewer bytes).
    ssize_t n = fault::WriteLength("staging.write", len_ - done_);
    if (n < 0) {
      injected_ = static_cast<int>(-n);
      io_uring_prep_nop(s);
    } else {
      io_uring_prep_write(s, snap_->staging_fd_.get(), data_ + done_, unsigned(n), off_ + done_);
    }
  }
  static void end(std::unique_ptr<StageWrite> self, int error) {
    auto next = self->snap_->staged(self->reactor_, self->len_, error);
    self.reset();
    if (next) Start(std::move(next));
  }

  std::shared_ptr<DiskSnapshot> snap_;
  Reactor& reactor_;
  std::shared_ptr<char[]> chunk_;  // keeps data_ alive
  const char* data_;
  uint64_t off_;
  uint32_t len_;
  uint32_t done_ = 0;
  int injected_ = 0;  // errno of an injected staging write fault
};

// Reads a run of sub-blocks' old content from the disk through the ring (when
// the inline RWF_NOWAIT read could not: not in the page cache), records it,
// then continues the write that asked for it. Owns itself while its ring
// operation is in flight.
class DiskSnapshot::CowOp final : public Reactor::Op {
 public:
  CowOp(std::shared_ptr<DiskSnapshot> snap, Reactor& reactor, uint64_t block, uint32_t s0,
        uint32_t n, std::function<void()> then)
      : snap_(std::move(snap)),
        reactor_(reactor),
        block_(block),
        s0_(s0),
        n_(n),
        then_(std::move(then)),
        buf_(AllocAligned(size_t{n} * snap_->sub_)) {
    off_ = block * snap_->granularity() + uint64_t{s0} * snap_->sub_;
    len_ =
        static_cast<uint32_t>(std::min<uint64_t>(uint64_t{n} * snap_->sub_, snap_->size() - off_));
    std::memset(buf_.get() + len_, 0, size_t{n} * snap_->sub_ - len_);
  }

  static void Start(std::unique_ptr<CowOp> op) { op.release()->issue(); }

  void complete(int res, uint32_t) override {
    std::unique_ptr<CowOp> self(this);  // freed unless handed back to the ring
    if (res == -EAGAIN || res == -EINTR) return self.release()->issue();
    if (res < 0) return done(std::move(self), -res);
    if (res == 0) {
      std::memset(buf_.get() + done_, 0, len_ - done_);  // past EOF reads as zeroes
      res = static_cast<int>(len_ - done_);
    }
    done_ += static_cast<uint32_t>(res);
    if (done_ < len_) return self.release()->issue();
    done(std::move(self), 0);
  }

 private:
  void issue() {
    io_uring_prep_read(reactor_.sqe(this), snap_->p_.data_fd, buf_.get() + done_, len_ - done_,
                       off_ + done_);
  }
  static void done(std::unique_ptr<CowOp> self, int error) {
    auto w = self->snap_->preserved(self->reactor_, self->block_, self->s0_, self->n_,
                                    self->buf_.get(), error);
    if (w) StageWrite::Start(std::move(w));
    auto then = std::move(self->then_);
    self.reset();
    then();
  }

  std::shared_ptr<DiskSnapshot> snap_;
  Reactor& reactor_;
  uint64_t block_;
  uint32_t s0_;
  uint32_t n_;
  std::function<void()> then_;
  AlignedBuf buf_;
  uint64_t off_ = 0;
  uint32_t len_ = 0;
  uint32_t done_ = 0;
};

DiskSnapshot::DiskSnapshot(Params p)
    : p_(std::move(p)),
      nblocks_((p_.size + p_.granularity - 1) / p_.granularity),
      sub_(std::gcd(p_.granularity, kSubBlock)),
      nsub_(p_.granularity / sub_),
      copied_(nblocks_),
      read_(nblocks_),
      preserved_(nblocks_) {
  if (p_.guest_ops) ops_seen_.store(p_.guest_ops->load(std::memory_order_relaxed));
  if (p_.guest_writes) writes_seen_.store(p_.guest_writes->load(std::memory_order_relaxed));
}

Result<std::shared_ptr<DiskSnapshot>> DiskSnapshot::Create(Params params, UniqueFd staging_fd) {
  if (!staging_fd) return Status::InvalidArgument("no staging file");
  if (params.granularity == 0) return Status::InvalidArgument("zero granularity");
  std::shared_ptr<DiskSnapshot> s(new DiskSnapshot(std::move(params)));
  s->staging_fd_ = std::move(staging_fd);
  return s;
}

DiskSnapshot::~DiskSnapshot() {
  finished_.store(true);
}

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

void DiskSnapshot::preserve_then(Reactor& reactor, uint64_t offset, uint64_t length,
                                 std::function<void()> cont) {
  if (length == 0 || offset >= p_.size) return cont();
  preserve_from(reactor, offset, length, offset / p_.granularity, std::move(cont));
}

void DiskSnapshot::preserve_from(Reactor& reactor, uint64_t offset, uint64_t length, uint64_t block,
                                 std::function<void()> cont) {
  const uint64_t end = std::min(offset + length, p_.size);
  const uint64_t last = (end - 1) / p_.granularity;
  // The inline read's buffer: one block at most (a run never leaves its block).
  thread_local std::vector<char> inline_buf;
  for (uint64_t b = block; b <= last;) {
    if (!needs_preserve(b)) {
      ++b;
      continue;
    }
    const uint64_t bstart = b * p_.granularity;
    const uint64_t bend = std::min(bstart + p_.granularity, p_.size);
    // Sub-blocks of b this request touches.
    const uint32_t lo = static_cast<uint32_t>((std::max(offset, bstart) - bstart) / sub_);
    const uint32_t hi = static_cast<uint32_t>((std::min(end, bend) - 1 - bstart) / sub_);
    std::unique_lock<std::mutex> lock(mu_);
    if (copied_.test(b)) {
      ++b;
      continue;
    }
    auto again = [&] {
      return [self = shared_from_this(), &reactor, offset, length, b, cont]() mutable {
        self->preserve_from(reactor, offset, length, b, std::move(cont));
      };
    };
    auto it = busy_.find(b);
    if (it != busy_.end()) {
      // Another write is preserving in this block: retry when it is done.
      it->second.push_back({&reactor, again()});
      return;
    }
    // The first run of sub-blocks not preserved yet.
    auto sit = subs_.find(b);
    uint32_t s0 = lo;
    if (sit != subs_.end()) {
      while (s0 <= hi && sit->second[s0] != kNotPreserved) ++s0;
    }
    if (s0 > hi) {
      ++b;  // all of them preserved already: the write may change them
      continue;
    }
    uint32_t s1 = s0;
    if (sit != subs_.end()) {
      while (s1 < hi && sit->second[s1 + 1] == kNotPreserved) ++s1;
    } else {
      s1 = hi;
    }
    if (slots_filled_ * sub_ - flushed_bytes_ >= kMaxUnflushed) {
      space_waiters_.push_back({&reactor, again()});  // resumed as the staging file catches up
      return;
    }
    busy_.emplace(b, std::vector<Waiter>{});
    lock.unlock();
    const uint32_t n = s1 - s0 + 1;
    const uint64_t off = bstart + uint64_t{s0} * sub_;
    const uint64_t len = std::min<uint64_t>(uint64_t{n} * sub_, p_.size - off);
    // Mostly the old data is in the page cache: read it here, without a ring round trip.
    if (inline_buf.size() < p_.granularity) inline_buf.resize(p_.granularity);
    ssize_t got = -1;
    if (len == uint64_t{n} * sub_) {
      iovec iov{inline_buf.data(), static_cast<size_t>(len)};
      got = ::preadv2(p_.data_fd, &iov, 1, static_cast<off_t>(off), RWF_NOWAIT);
    }
    if (got == static_cast<ssize_t>(len)) {
      auto w = preserved(reactor, b, s0, n, inline_buf.data(), 0);
      if (w) StageWrite::Start(std::move(w));
      continue;  // the rest of b, then the next blocks
    }
    auto next = [self = shared_from_this(), &reactor, offset, length, b, cont]() mutable {
      self->preserve_from(reactor, offset, length, b, std::move(cont));
    };
    CowOp::Start(std::make_unique<CowOp>(shared_from_this(), reactor, b, s0, n, std::move(next)));
    return;
  }
  cont();
}

void DiskSnapshot::release_busy(uint64_t block) {
  auto it = busy_.find(block);
  if (it == busy_.end()) return;
  for (Waiter& w : it->second) w.reactor->post(std::move(w.resume));
  busy_.erase(it);
}

void DiskSnapshot::wake_space_waiters() {
  for (Waiter& w : space_waiters_) w.reactor->post(std::move(w.resume));
  space_waiters_.clear();
}

void DiskSnapshot::break_locked(const std::string& why, int error) {
  if (broken_.exchange(true)) return;
  broken_reason_ =
      why + ": " + std::strerror(error) + (error == ENOSPC ? " (staging_dir is full)" : "");
  spdlog::error("disk {}: {}; the restore point fails, guest writes go on", p_.disk_name,
                broken_reason_);
  wake_space_waiters();  // they pass straight through now
}

std::unique_ptr<DiskSnapshot::StageWrite> DiskSnapshot::preserved(Reactor& reactor, uint64_t block,
                                                                  uint32_t s0, uint32_t n,
                                                                  const char* buf, int error) {
  std::lock_guard<std::mutex> lock(mu_);
  if (copied_.test(block)) {
    // The copier took the block while this preserve was reading (its read
    // ran before this write was issued, so it holds the cut content): the
    // old content is not needed any more, and the write may go on.
    release_busy(block);
    return next_stage_write(reactor);
  }
  if (error != 0) {
    break_locked("copy-before-write of block " + std::to_string(block) + " failed reading the disk",
                 error);
  } else {
    auto& v = subs_[block];
    if (v.empty()) v.assign(nsub_, kNotPreserved);
    const uint64_t chunk_bytes = uint64_t{kChunkSlots} * sub_;
    bool staged = false;
    for (uint32_t i = 0; i < n; ++i) {
      const char* p = buf + size_t{i} * sub_;
      if (AllZero(p, sub_)) {
        // Zeroes at the cut (a hole, an unallocated or zeroed range): the
        // entry says it all; staging bytes are for real data only.
        v[s0 + i] = kZeroAtCut;
        zero_count_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      const uint64_t slot = slots_filled_++;
      auto& chunk = chunks_[slot / kChunkSlots];
      if (!chunk) chunk = std::shared_ptr<char[]>(new char[chunk_bytes]);
      std::memcpy(chunk.get() + (slot % kChunkSlots) * sub_, p, sub_);
      v[s0 + i] = static_cast<uint32_t>(slot);
      staged_count_.fetch_add(1, std::memory_order_relaxed);
      staged = true;
    }
    if (staged) preserved_.set(block);
    const uint64_t bytes = std::min<uint64_t>(p_.granularity, p_.size - block * p_.granularity);
    const uint32_t in_range = static_cast<uint32_t>((bytes + sub_ - 1) / sub_);
    if (std::all_of(v.begin(), v.begin() + in_range,
                    [](uint32_t e) { return e != kNotPreserved; })) {
      copied_.set(block);  // all of it is preserved: later writes go straight through
    }
  }
  if (error != 0) copied_.set(block);
  release_busy(block);
  return next_stage_write(reactor);
}

std::unique_ptr<DiskSnapshot::StageWrite> DiskSnapshot::next_stage_write(Reactor& reactor) {
  if (stage_write_in_flight_ || broken_.load() || finished_.load()) return nullptr;
  const uint64_t filled = slots_filled_ * sub_;
  if (flushed_bytes_ >= filled) return nullptr;
  const uint64_t chunk_bytes = uint64_t{kChunkSlots} * sub_;
  const uint64_t c = flushed_bytes_ / chunk_bytes;
  const uint64_t end = std::min(filled, (c + 1) * chunk_bytes);
  auto it = chunks_.find(c);
  if (it == chunks_.end()) return nullptr;  // cannot happen: unflushed chunks stay
  stage_write_in_flight_ = true;
  const char* data = it->second.get() + (flushed_bytes_ - c * chunk_bytes);
  return std::make_unique<StageWrite>(shared_from_this(), reactor, it->second, data, flushed_bytes_,
                                      static_cast<uint32_t>(end - flushed_bytes_));
}

std::unique_ptr<DiskSnapshot::StageWrite> DiskSnapshot::staged(Reactor& reactor, uint64_t bytes,
                                                               int error) {
  std::lock_guard<std::mutex> lock(mu_);
  stage_write_in_flight_ = false;
  stage_cv_.notify_all();
  if (error != 0) {
    break_locked("copy-before-write to staging_dir failed", error);
    return nullptr;
  }
  const uint64_t chunk_bytes = uint64_t{kChunkSlots} * sub_;
  flushed_bytes_ += bytes;
  if (flushed_bytes_ % chunk_bytes == 0) {
    // That chunk is all on the staging file now (a copier reading it holds its own reference).
    chunks_.erase(flushed_bytes_ / chunk_bytes - 1);
  }
  wake_space_waiters();
  return next_stage_write(reactor);
}

namespace {

int64_t SteadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Moves *when to now if *counter moved since *seen last held it.
void Notice(const std::atomic<uint64_t>* counter, std::atomic<uint64_t>& seen,
            std::atomic<int64_t>& when, int64_t now) {
  if (!counter) return;
  const uint64_t v = counter->load(std::memory_order_relaxed);
  if (seen.exchange(v, std::memory_order_relaxed) != v) when.store(now, std::memory_order_relaxed);
}

}  // namespace

DiskSnapshot::GuestSeen DiskSnapshot::watch_guest() {
  const int64_t now = SteadyNs();
  Notice(p_.guest_ops, ops_seen_, op_seen_ns_, now);
  Notice(p_.guest_writes, writes_seen_, write_seen_ns_, now);
  return {op_seen_ns_.load(std::memory_order_relaxed),
          write_seen_ns_.load(std::memory_order_relaxed)};
}

void DiskSnapshot::pace() {
  if (!p_.guest_ops) return;
  // Per copy thread: when it last came back for a block. The time since is
  // its work on the last block; a guest request seen since makes it yield.
  thread_local struct {
    const DiskSnapshot* owner = nullptr;
    int64_t since = 0;
  } t;
  const int64_t now = SteadyNs();
  if (t.owner == this && watch_guest().op_ns >= t.since) {
    // The guest is busy: work at most kGuestBusyDuty of the time, but never
    // sleep long per block, so the copy ends however busy the guest stays.
    const auto work = std::chrono::nanoseconds(now - t.since);
    auto pause = std::chrono::duration_cast<std::chrono::microseconds>(
        work * ((1.0 - kGuestBusyDuty) / kGuestBusyDuty));
    std::this_thread::sleep_for(
        std::min<std::chrono::microseconds>(pause, std::chrono::milliseconds(50)));
  }
  t.owner = this;
  watch_guest();  // what moved while it slept is not the next block's work
  t.since = SteadyNs();
}

bool DiskSnapshot::guest_busy_buffered() {
  if (!p_.guest_writes || p_.guest_direct) return false;
  return SteadyNs() - watch_guest().write_ns < std::chrono::nanoseconds(kQuietBeforeDirect).count();
}

Status DiskSnapshot::read_block(uint64_t block, char* buf) {
  return read_blocks(block, 1, buf);
}

Status DiskSnapshot::read_blocks(uint64_t first, uint32_t n, char* buf, int direct_fd) {
  if (n == 0) return Status::Ok();
  if (first >= nblocks_ || n > nblocks_ - first) {
    return Status::OutOfRange("block beyond the snapshot");
  }
  pace();
  const uint64_t off = first * p_.granularity;
  const uint64_t len = std::min<uint64_t>(uint64_t{n} * p_.granularity, p_.size - off);
  auto range_of = [&](uint32_t i) {
    const uint64_t at = uint64_t{i} * p_.granularity;
    return static_cast<uint32_t>((std::min<uint64_t>(p_.granularity, len - at) + sub_ - 1) / sub_);
  };
  // The run is read from the disk in one read, with no block of it held
  // against copy-before-write: a guest write landing in the run meanwhile
  // preserves the sub-blocks it touches itself (a 4 KiB read, instead of
  // waiting for the whole run's read), and what it preserved is laid over
  // the read afterwards. That is exact because a write is issued only once
  // its sub-blocks are in the log: a sub-block still unpreserved after the
  // read was not written during it (nor since the cut), so the read holds its
  // cut content; a preserved one may have been read before or after its
  // write, so the log's copy is taken. Entries only ever go from not
  // preserved to preserved, so the map taken after the read is the one to use.
  bool from_disk = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.load()) return Status::IoError(broken_reason_);
    for (uint32_t i = 0; i < n; ++i) {
      if (read_.test(first + i)) {
        return Status::Internal("block " + std::to_string(first + i) +
                                " of the snapshot read twice");
      }
    }
    for (uint32_t i = 0; i < n; ++i) {
      read_.set(first + i);  // claimed: a second read of it is a bug
      auto it = subs_.find(first + i);
      if (it == subs_.end() || std::any_of(it->second.begin(), it->second.begin() + range_of(i),
                                           [](uint32_t e) { return e == kNotPreserved; })) {
        from_disk = true;  // else every sub-block of it is in the log already
      }
    }
  }
  // One read for the whole run (the preserved sub-blocks it covers are
  // overwritten from the log below). While the guest writes to a buffered
  // disk, through the page cache, not O_DIRECT: on ext4 an O_DIRECT read
  // holds the inode lock (shared) while it writes back and waits for the
  // dirty pages of its range, and every buffered guest write to the file
  // waits for that lock meanwhile. A buffered read takes no inode lock and is
  // as exact: the page cache holds every completed buffered write (what the
  // O_DIRECT read would have flushed to the device first). Once the guest
  // stops writing, O_DIRECT again: no copy of the disk through the page cache
  // (guest reads alone do not contend with an O_DIRECT read).
  Status st;
  if (from_disk) {
    if (direct_fd >= 0 && guest_busy_buffered()) {
      direct_fd = -1;
      runs_buffered_.fetch_add(1, std::memory_order_relaxed);
    }
    st = PreadDirect(direct_fd, p_.data_fd, buf, len, off, "disk " + p_.disk_name, "snapshot.read",
                     uint64_t{n} * p_.granularity);
  }
  // Per block of the run: its sub-block map (empty: nothing preserved) and
  // the log chunk in memory per staged sub-block, taken after the read. From
  // here on the blocks are copied: later writes go straight through, and a
  // preserve still in flight is dropped (preserved()).
  std::vector<std::vector<uint32_t>> subs(n);
  std::vector<std::vector<std::shared_ptr<char[]>>> mem(n);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (uint32_t i = 0; i < n; ++i) {
      const uint64_t block = first + i;
      copied_.set(block);
      auto it = subs_.find(block);
      if (it == subs_.end()) continue;
      subs[i] = std::move(it->second);
      subs_.erase(it);
      mem[i].resize(subs[i].size());
      for (uint32_t j = 0; j < range_of(i); ++j) {
        if (subs[i][j] >= kZeroAtCut) continue;
        auto c = chunks_.find(subs[i][j] / kChunkSlots);
        if (c != chunks_.end()) mem[i][j] = c->second;
      }
    }
  }
  for (uint32_t i = 0; st.ok() && i < n; ++i) {
    char* b = buf + uint64_t{i} * p_.granularity;
    const uint64_t blen = std::min<uint64_t>(p_.granularity, len - uint64_t{i} * p_.granularity);
    for (uint32_t j = 0; st.ok() && j < subs[i].size() && j < range_of(i); ++j) {
      const uint64_t at = uint64_t{j} * sub_;
      const uint64_t k = std::min<uint64_t>(sub_, blen - at);
      const uint32_t e = subs[i][j];
      if (e == kNotPreserved) continue;
      if (e == kZeroAtCut) {
        std::memset(b + at, 0, k);
      } else if (mem[i][j]) {
        std::memcpy(b + at, mem[i][j].get() + (e % kChunkSlots) * sub_, k);
      } else {
        st = PreadFull(staging_fd_.get(), b + at, k, uint64_t{e} * sub_,
                       "the staging file of disk " + p_.disk_name, "snapshot.read");
      }
    }
  }
  if (len < uint64_t{n} * p_.granularity) std::memset(buf + len, 0, n * p_.granularity - len);
  return st;
}

Result<SparseBitmap> DiskSnapshot::to_copy() {
  SparseBitmap out(nblocks_);
  if (!p_.full) {
    for (const auto& f : p_.frozen) out.merge(*f);
    return out;
  }
  // Every block allocated at the cut. A block allocated then and written since
  // was preserved first (into the log, or as zero), so allocation now plus the
  // blocks with staged sub-blocks covers the cut's allocation. A block that was zero at the
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
  std::unique_lock<std::mutex> lock(mu_);
  wake_space_waiters();  // they pass straight through now
  // No new write-behind starts once finished_ is set; the one in flight ends
  // in microseconds while its reactor runs. (Bounded: a stopped reactor never
  // completes it.)
  stage_cv_.wait_for(lock, std::chrono::seconds(2), [&] { return !stage_write_in_flight_; });
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
