#include "ublk/device.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <thread>

namespace rpoint {

namespace {

uint8_t Shift(uint32_t v) {
  uint8_t s = 0;
  while ((uint64_t{1} << (s + 1)) <= v) ++s;
  return s;
}

// devtmpfs makes /dev/ublkcN as ADD_DEV returns; udev may still be setting
// its mode. A short wait covers both.
Result<UniqueFd> OpenCharDevice(const std::string& path) {
  for (int i = 0;; ++i) {
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (fd) return fd;
    int err = errno;
    if ((err != ENOENT && err != EACCES) || i >= 200) return Status::FromErrno(err, "open " + path);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace

Status CheckUblkMaxIoBytes(uint32_t bytes) {
  if (bytes < 4096 || bytes > kUblkMaxIoBytes || (bytes & (bytes - 1)) != 0) {
    return Status::InvalidArgument("ublk.max_io_bytes must be a power of two from 4096 to " +
                                   std::to_string(kUblkMaxIoBytes) + ", got " +
                                   std::to_string(bytes));
  }
  return Status::Ok();
}

ublk_params UblkParamsFor(const BlockDevice& dev, uint32_t max_io_bytes) {
  DeviceCaps caps = dev.caps();
  ublk_params p{};
  p.len = sizeof(p);
  p.types = UBLK_PARAM_TYPE_BASIC;
  // A flush is fdatasync of the backing file: the device has a volatile cache
  // (the host's page cache) and honours FUA.
  p.basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
  if (caps.read_only) p.basic.attrs |= UBLK_ATTR_READ_ONLY;
  if (caps.rotational) p.basic.attrs |= UBLK_ATTR_ROTATIONAL;
  // 512-byte sectors (every disk is a whole number of them), 4 KiB physical
  // blocks so filesystems align to the pages O_DIRECT and tracking like.
  p.basic.logical_bs_shift = 9;
  p.basic.physical_bs_shift = 12;
  p.basic.io_min_shift = 12;
  p.basic.io_opt_shift = Shift(std::max<uint32_t>(caps.preferred_block, 4096));
  p.basic.max_sectors = max_io_bytes >> 9;
  p.basic.dev_sectors = dev.size() >> 9;
  if (caps.can_trim || caps.can_zero) {
    p.types |= UBLK_PARAM_TYPE_DISCARD;
    p.discard.discard_granularity = 4096;  // the driver wants it non-zero
    p.discard.max_discard_segments = 1;    // the only count the driver takes
    uint32_t max = UINT_MAX >> 9;          // whole sectors below 4 GiB
    if (caps.can_trim) p.discard.max_discard_sectors = max;
    if (caps.can_zero) p.discard.max_write_zeroes_sectors = max;
  }
  return p;
}

Result<std::unique_ptr<UblkDevice>> UblkDevice::Add(UblkControl& ctl,
                                                    std::shared_ptr<BlockDevice> dev,
                                                    const UblkDeviceOptions& opts, int dev_id) {
  unsigned nq = opts.queues ? opts.queues : std::max(1u, std::thread::hardware_concurrency());
  if (opts.depth == 0 || opts.depth > UBLK_MAX_QUEUE_DEPTH) {
    return Status::InvalidArgument("ublk.depth must be 1.." + std::to_string(UBLK_MAX_QUEUE_DEPTH));
  }
  if (Status s = CheckUblkMaxIoBytes(opts.max_io_bytes); !s.ok()) return s;
  std::unique_ptr<UblkDevice> d(new UblkDevice(ctl, std::move(dev), opts));
  ublksrv_ctrl_dev_info info{};
  info.nr_hw_queues = static_cast<uint16_t>(nq);
  info.queue_depth = static_cast<uint16_t>(opts.depth);
  info.max_io_buf_bytes = opts.max_io_bytes;
  info.dev_id = dev_id < 0 ? UINT32_MAX : static_cast<uint32_t>(dev_id);
  info.ublksrv_pid = ::getpid();
  // The device outlives this process: a restarted rpointd takes it over and
  // the requests in flight are sent again (a block device may see a write twice).
  info.flags = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
  using ZeroCopy = UblkDeviceOptions::ZeroCopy;
  if (opts.user_copy || opts.zero_copy != ZeroCopy::kOff) {
    // Drivers before 6.5 have neither the command nor the flags: buffer mode.
    auto features = ctl.get_features();
    uint64_t f = features.ok() ? features.value() : 0;
    if (!features.ok()) spdlog::debug("ublk: GET_FEATURES: {}", features.status().ToString());
    bool fixed = d->dev_->caps().fixed_buffers;
    if (opts.zero_copy != ZeroCopy::kOff && (f & kUblkFAutoBufReg) && fixed) {
      info.flags |= kUblkFAutoBufReg;
    } else if (opts.zero_copy == ZeroCopy::kOn) {
      return Status::Unsupported(
          "ublk.zero_copy is on, but " +
          std::string(!fixed ? "disk " + d->dev_->name() + " cannot take registered buffers"
                             : "this kernel's ublk driver has no UBLK_F_AUTO_BUF_REG (6.16+)") +
          "; set ublk.zero_copy to auto to serve it with a copy");
    } else if (opts.user_copy && (f & kUblkFUserCopy)) {
      info.flags |= kUblkFUserCopy;
    }
  }
  auto added = ctl.add_dev(info);
  if (!added.ok()) return added.status();
  d->info_ = added.value();
  if ((info.flags & kUblkFAutoBufReg) && !d->zero_copy()) {
    // The driver clears flags it does not know; GET_FEATURES said it knew it.
    spdlog::warn("ublk {}: the driver dropped UBLK_F_AUTO_BUF_REG: {}", d->info_.dev_id,
                 d->copy_mode_name());
  }
  // From here a failure deletes the half-made device.
  auto fail = [&d](Status s) -> Status {
    d->stop_queues();
    d->char_fd_.reset();
    Status del = d->ctl_.del_dev(d->info_.dev_id);
    if (!del.ok()) spdlog::warn("ublk {}: cleanup: {}", d->info_.dev_id, del.ToString());
    d->gone_ = true;
    return s;
  };
  Status s = ctl.set_params(d->info_.dev_id, UblkParamsFor(*d->dev_, d->info_.max_io_buf_bytes));
  if (!s.ok()) return fail(s);
  s = d->open_queues();
  if (!s.ok()) return fail(s);
  s = ctl.start_dev(d->info_.dev_id, ::getpid());
  if (!s.ok()) return fail(s);
  spdlog::info("ublk {}: {} serves disk {} ({} queue(s), depth {}, {}, {} rings{})",
               d->info_.dev_id, d->block_path(), d->dev_->name(), d->info_.nr_hw_queues,
               d->info_.queue_depth, d->copy_mode_name(), d->ring_mode_name(),
               d->pin_queues_ ? ", queues pinned" : "");
  return d;
}

Result<std::unique_ptr<UblkDevice>> UblkDevice::Recover(UblkControl& ctl,
                                                        std::shared_ptr<BlockDevice> dev,
                                                        const ublksrv_ctrl_dev_info& info,
                                                        const UblkDeviceOptions& opts) {
  std::unique_ptr<UblkDevice> d(new UblkDevice(ctl, std::move(dev), opts));
  d->info_ = info;
  if (!(info.flags & UBLK_F_USER_RECOVERY)) {
    d->gone_ = true;
    return Status::Conflict("ublk device " + std::to_string(info.dev_id) +
                            " was made without USER_RECOVERY");
  }
  if (d->zero_copy() && !d->dev_->caps().fixed_buffers) {
    d->gone_ = true;
    return Status::Conflict("ublk device " + std::to_string(info.dev_id) +
                            " was made with zero copy, which disk " + d->dev_->name() +
                            " cannot take");
  }
  // The old server's ring may still be going away: the driver says EBUSY until
  // the device is quiesced and its char device released.
  Status s;
  for (int i = 0; i < 300; ++i) {
    s = ctl.start_user_recovery(info.dev_id);
    if (s.code() != Code::kConflict) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!s.ok()) {
    d->gone_ = true;
    return s;
  }
  s = d->open_queues();
  if (s.ok()) s = ctl.end_user_recovery(info.dev_id, ::getpid());
  if (!s.ok()) {
    d->stop_queues();
    d->char_fd_.reset();
    d->gone_ = true;  // still quiesced: the next start tries again
    return s;
  }
  spdlog::info("ublk {}: recovered {} for disk {} ({} queue(s), depth {}, {}, {} rings{})",
               info.dev_id, d->block_path(), d->dev_->name(), info.nr_hw_queues, info.queue_depth,
               d->copy_mode_name(), d->ring_mode_name(), d->pin_queues_ ? ", queues pinned" : "");
  return d;
}

Status UblkDevice::open_queues() {
  auto fd = OpenCharDevice(char_path());
  if (!fd.ok()) return fd.status();
  char_fd_ = std::move(fd).value();
  for (uint16_t q = 0; q < info_.nr_hw_queues; ++q) {
    UblkQueueOptions o;
    o.dev_id = info_.dev_id;
    o.q_id = q;
    o.depth = info_.queue_depth;
    o.max_io_bytes = info_.max_io_buf_bytes;
    o.char_fd = char_fd_.get();
    o.user_copy = user_copy();
    o.auto_buf_reg = zero_copy();
    o.ring_mode = ring_mode_;
    if (pin_queues_) {
      auto cpus = ctl_.get_queue_affinity(info_.dev_id, q);
      if (cpus.ok() && CPU_COUNT(&cpus.value()) > 0) {
        o.pin = true;
        o.cpus = cpus.value();
      } else if (!cpus.ok()) {
        spdlog::warn("ublk {} queue {}: not pinned: {}", info_.dev_id, q, cpus.status().ToString());
      }
    }
    auto queue = UblkQueue::Create(o, dev_);
    if (!queue.ok()) return queue.status();
    queues_.push_back(std::move(queue).value());
    queues_.back()->start();
  }
  return Status::Ok();
}

void UblkDevice::stop_queues() {
  for (auto& q : queues_) q->drain_and_stop();
  queues_.clear();  // unmaps the descriptors, closes the rings
}

bool UblkDevice::queues_failed() const {
  for (const auto& q : queues_) {
    if (q->failed()) return true;
  }
  return false;
}

Status UblkDevice::remove() {
  if (gone_) return Status::Ok();
  // The queues still answer while STOP_DEV removes the disk (it flushes).
  Status s = ctl_.stop_dev(info_.dev_id);
  if (!s.ok()) spdlog::warn("ublk {}: {}", info_.dev_id, s.ToString());
  stop_queues();
  char_fd_.reset();
  gone_ = true;
  Status del = ctl_.del_dev(info_.dev_id);
  if (!del.ok()) return del;
  spdlog::info("ublk {}: {} deleted", info_.dev_id, block_path());
  return s;
}

Status UblkDevice::check_idle() const {
  if (gone_) return Status::Ok();
  UniqueFd fd(::open(block_path().c_str(), O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK));
  if (fd) return Status::Ok();  // nobody holds it; closed at once
  if (errno == EBUSY) {
    return Status::Conflict(block_path() +
                            " is in use (mounted or opened exclusively on this host); "
                            "unmount it first, or delete with force");
  }
  // Any other failure (the node not there yet) says nothing about users.
  spdlog::debug("ublk {}: probing {}: {}", info_.dev_id, block_path(), std::strerror(errno));
  return Status::Ok();
}

void UblkDevice::detach() {
  if (gone_) return;
  stop_queues();
  char_fd_.reset();
  gone_ = true;
  spdlog::info("ublk {}: {} left for recovery by the next rpointd", info_.dev_id, block_path());
}

UblkDevice::~UblkDevice() {
  detach();
}

}  // namespace rpoint
