// UblkDevice: one disk served as /dev/ublkbN, its control steps in order.
//
// New device: ADD_DEV (USER_RECOVERY | USER_RECOVERY_REISSUE, so the device
// outlives this process; USER_COPY when the driver has it), SET_PARAMS, open
// /dev/ublkcN, the queues (each on its own thread, fetching every tag),
// START_DEV from this (control) thread.
// Recovery of a device a previous rpointd left (killed, or a clean stop that
// kept it): START_USER_RECOVERY, queues with the device's own queue count and
// depth, END_USER_RECOVERY; the number and /dev/ublkbN stay, requests the old
// server had not answered are sent again; the queues copy data the way the
// device was made (its flags say whether USER_COPY).
// Remove: STOP_DEV, queues stopped, descriptors unmapped and the char device
// closed (DEL_DEV waits while they are held), DEL_DEV. Detach (shutdown):
// queues drained and stopped, the kernel device left quiesced for recovery.
//
// Thread-safety: a UblkDevice is driven by one control thread at a time
// (UblkService's lock); its queues run on their own threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "engine/block_device.h"
#include "ublk/control.h"
#include "ublk/queue.h"

namespace rpoint {

struct UblkDeviceOptions {
  unsigned queues = 0;  // 0: one per CPU
  unsigned depth = 128;
  // The largest request (max_io_buf_bytes, and max_sectors in the params): a
  // power of two from 4 KiB to kUblkMaxIoBytes. Each queue reserves depth *
  // max_io_bytes of address space for the tags' buffers, touched only by the
  // requests that use it.
  uint32_t max_io_bytes = 1024 * 1024;
  // UBLK_F_USER_COPY when the driver has it (GET_FEATURES says so; 6.5+):
  // the queues copy the data themselves, off the queue thread. Otherwise, or
  // false, the driver copies into the tag's buffer (buffer mode).
  bool user_copy = true;
  // Zero copy (UBLK_F_AUTO_BUF_REG, 6.16+; ublk/control.h), ahead of user
  // copy: kAuto when GET_FEATURES offers it and the BlockDevice takes fixed
  // buffers; kOn the same but a device that cannot have it is not made;
  // kOff never. Explicit registration (UBLK_F_SUPPORT_ZERO_COPY with
  // REGISTER_IO_BUF, 6.15) is not used: such kernels get the copy paths.
  enum class ZeroCopy { kAuto, kOn, kOff };
  ZeroCopy zero_copy = ZeroCopy::kAuto;
  // The queues' rings (UblkQueueOptions::ring_mode); a recovered device's
  // queues take it too.
  Reactor::RingMode ring_mode = Reactor::RingMode::kPlain;
  // Each queue's thread pinned to the CPUs the driver maps to its queue
  // (GET_QUEUE_AFFINITY), as ublksrv does; recovered devices too.
  bool pin_queues = false;
};

class UblkDevice {
 public:
  // A new kernel device for `dev` (dev_id < 0: the kernel picks the number).
  static Result<std::unique_ptr<UblkDevice>> Add(UblkControl& ctl, std::shared_ptr<BlockDevice> dev,
                                                 const UblkDeviceOptions& opts, int dev_id);
  // Takes over the kernel device `dev_id` that a previous server left.
  // Of `opts` only ring_mode applies: the rest is the device's own (`info`).
  static Result<std::unique_ptr<UblkDevice>> Recover(UblkControl& ctl,
                                                     std::shared_ptr<BlockDevice> dev,
                                                     const ublksrv_ctrl_dev_info& info,
                                                     const UblkDeviceOptions& opts);
  ~UblkDevice();  // detach() unless removed

  // STOP_DEV, queues, munmap/close, DEL_DEV.
  Status remove();
  // Queues stop; the kernel device stays for the next server.
  void detach();
  // Conflict when /dev/ublkbN is mounted or open with O_EXCL by anyone: an
  // O_EXCL open of a block device fails with EBUSY exactly then. Runs while
  // the queues serve (the open may read the device).
  Status check_idle() const;

  int dev_id() const { return static_cast<int>(info_.dev_id); }
  std::string block_path() const { return "/dev/ublkb" + std::to_string(info_.dev_id); }
  std::string char_path() const { return "/dev/ublkc" + std::to_string(info_.dev_id); }
  bool queues_failed() const;
  bool user_copy() const { return (info_.flags & kUblkFUserCopy) != 0; }
  bool zero_copy() const { return (info_.flags & kUblkFAutoBufReg) != 0; }
  // "zero copy", "user copy" or "buffer copy" (the log lines' words).
  const char* copy_mode_name() const {
    return zero_copy() ? "zero copy" : user_copy() ? "user copy" : "buffer copy";
  }
  // The ring mode the queues got from the kernel (RingModeName).
  const char* ring_mode_name() const {
    return queues_.empty() ? "no" : RingModeName(queues_.front()->ring_mode());
  }

 private:
  UblkDevice(UblkControl& ctl, std::shared_ptr<BlockDevice> dev, const UblkDeviceOptions& opts)
      : ctl_(ctl), dev_(std::move(dev)), ring_mode_(opts.ring_mode), pin_queues_(opts.pin_queues) {}
  Status open_queues();
  void stop_queues();

  UblkControl& ctl_;
  std::shared_ptr<BlockDevice> dev_;
  Reactor::RingMode ring_mode_;
  bool pin_queues_;
  ublksrv_ctrl_dev_info info_{};
  UniqueFd char_fd_;
  std::vector<std::unique_ptr<UblkQueue>> queues_;
  bool gone_ = false;  // removed (or never fully made): nothing to detach
};

// A device's largest request must be a power of two from 4 KiB (whole pages:
// the driver rounds down to them; O_DIRECT) to kUblkMaxIoBytes (beyond it a
// tag's user-copy window would overlap the next tag's). Config checks the same
// bounds at load (config/config.h); this guards every other caller.
Status CheckUblkMaxIoBytes(uint32_t bytes);

// The params a device of `dev` gets: sizes, block sizes, discard and
// write-zeroes limits, flush and FUA.
ublk_params UblkParamsFor(const BlockDevice& dev, uint32_t max_io_bytes);

}  // namespace rpoint
