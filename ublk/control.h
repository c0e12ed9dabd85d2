// UblkControl: the control path of ublk, the commands on /dev/ublk-control.
//
// A small io_uring created with IORING_SETUP_SQE128 (the driver refuses
// control commands in 64-byte SQEs) on which each command is one URING_CMD
// carrying a `struct ublksrv_ctrl_cmd`. Opcodes are the legacy numbers of
// Debian 12's 6.1 UAPI header <linux/ublk_cmd.h>, which 6.12 still accepts
// (checked below against the header, not copied from it). Every command has a
// timeout: a driver that never answers gives TimedOut (IoError), never a hang.
// The I/O path (per-queue FETCH/COMMIT_AND_FETCH) is ublk/queue.h, on threads
// of its own, as ublksrv separates them.
//
// Thread-safety: all methods are safe from any thread; commands run one at a
// time (a mutex), each blocking its caller up to the timeout. Never call from
// a reactor thread. START_DEV and END_USER_RECOVERY wait in the kernel until
// every queue has fetched every tag: the queues must already be running.
#pragma once

#include <liburing.h>
#include <linux/ublk_cmd.h>
#include <sched.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "common/status.h"
#include "common/unique_fd.h"

namespace rpoint {

// The numbers docs and other servers use; a mismatch with the header we
// build against is a build error.
static_assert(UBLK_CMD_GET_DEV_INFO == 0x02 && UBLK_CMD_ADD_DEV == 0x04 &&
              UBLK_CMD_DEL_DEV == 0x05 && UBLK_CMD_START_DEV == 0x06 && UBLK_CMD_STOP_DEV == 0x07 &&
              UBLK_CMD_SET_PARAMS == 0x08 && UBLK_CMD_START_USER_RECOVERY == 0x10 &&
              UBLK_CMD_END_USER_RECOVERY == 0x11);
static_assert(UBLK_F_USER_RECOVERY == (1u << 3) && UBLK_F_USER_RECOVERY_REISSUE == (1u << 4));
static_assert(UBLK_S_DEV_DEAD == 0 && UBLK_S_DEV_LIVE == 1 && UBLK_S_DEV_QUIESCED == 2);
static_assert(sizeof(ublksrv_ctrl_cmd) == 32, "fits the 80-byte cmd area of an SQE128");
static_assert(sizeof(ublksrv_ctrl_dev_info) == 64);

inline constexpr const char* kUblkControlPath = "/dev/ublk-control";

// Newer than Debian 12's 6.1 header, so defined here (values of the 6.5+
// header). USER_COPY: the server copies a request's data itself, by pread /
// pwrite on /dev/ublkcN at UblkUserCopyPos(), instead of the driver copying
// into the buffer at the command's `addr` on the queue thread.
inline constexpr uint64_t kUblkFUserCopy = 1ull << 7;
// UBLK_F_AUTO_BUF_REG (6.16+): zero copy. Before the driver hands a request
// with data to the server it registers the request's own pages in the
// fixed-buffer table of the ring that carried the FETCH / COMMIT_AND_FETCH,
// at the index that command gave in sqe->addr (struct ublk_auto_buf_reg:
// bits 0-15 index, 16-23 flags, the rest zero); the commit unregisters it.
// The server's I/O then uses READ_FIXED / WRITE_FIXED on that index (offset
// 0 = the request's first byte): nobody copies the data.
inline constexpr uint64_t kUblkFAutoBufReg = 1ull << 11;
static_assert(UBLK_F_SUPPORT_ZERO_COPY == (1ull << 0));
// UBLK_U_CMD_GET_FEATURES, _IOR('u', 0x13, struct ublksrv_ctrl_cmd) (6.5+):
// the driver's feature bits in an 8-byte buffer. Older drivers refuse it.
inline constexpr uint32_t kUblkCmdGetFeatures = (2u << 30) | (32u << 16) | ('u' << 8) | 0x13;
inline constexpr uint64_t kUblkIoBufOffset = 0x80000000ull;  // UBLKSRV_IO_BUF_OFFSET
inline constexpr unsigned kUblkTagOff = 25;                  // UBLK_TAG_OFF
inline constexpr unsigned kUblkQidOff = 41;                  // UBLK_QID_OFF
static_assert(UBLKSRV_IO_BUF_OFFSET == kUblkIoBufOffset);
// The largest max_io_buf_bytes a device may have: a tag's window in the
// user-copy space (UBLK_IO_BUF_BITS == UBLK_TAG_OFF, "single IO buffer max
// size is 32MB" in the 6.5+ header). The driver itself only rounds the size
// down to pages (ublk_align_max_io_size), and SET_PARAMS refuses max_sectors
// above it.
inline constexpr uint32_t kUblkMaxIoBytes = 1u << kUblkTagOff;
// Where tag `tag` of queue `q_id` reads and writes its data in /dev/ublkcN.
constexpr uint64_t UblkUserCopyPos(uint16_t q_id, uint16_t tag) {
  return kUblkIoBufOffset + (uint64_t{q_id} << kUblkQidOff) + (uint64_t{tag} << kUblkTagOff);
}

class UblkControl {
 public:
  // Unavailable (with the kernel module's name and how to load it) when
  // `path` does not exist.
  static Result<std::unique_ptr<UblkControl>> Open(
      const std::string& path = kUblkControlPath,
      std::chrono::milliseconds timeout = std::chrono::seconds(30));
  ~UblkControl();
  UblkControl(const UblkControl&) = delete;
  UblkControl& operator=(const UblkControl&) = delete;

  // Why ublk cannot be used on this host ("" when /dev/ublk-control exists).
  static std::string UnavailableReason(const std::string& path = kUblkControlPath);

  // info.dev_id = -1u asks the kernel to pick a number; the answer is the
  // device as the kernel made it.
  Result<ublksrv_ctrl_dev_info> add_dev(const ublksrv_ctrl_dev_info& info);
  Status set_params(uint32_t dev_id, const ublk_params& params);
  Status start_dev(uint32_t dev_id, int pid);
  Status stop_dev(uint32_t dev_id);
  Status del_dev(uint32_t dev_id);
  // NotFound when there is no such device.
  Result<ublksrv_ctrl_dev_info> get_dev_info(uint32_t dev_id);
  // Conflict (EBUSY) while the old server is still being torn down.
  Status start_user_recovery(uint32_t dev_id);
  Status end_user_recovery(uint32_t dev_id, int pid);
  // The driver's UBLK_F_* feature bits; an error on drivers before 6.5,
  // which have no such command (callers take that as "none of the new ones").
  Result<uint64_t> get_features();
  // The CPUs whose requests blk-mq sends to queue `q_id` of the device
  // (GET_QUEUE_AFFINITY).
  Result<cpu_set_t> get_queue_affinity(uint32_t dev_id, uint16_t q_id);

 private:
  UblkControl() = default;
  // Runs one command; returns the CQE's res (>= 0) or an error naming `what`.
  Result<int> run(uint32_t op, uint32_t dev_id, void* buf, uint16_t len, uint64_t data0,
                  const char* what, uint16_t queue_id = static_cast<uint16_t>(-1));

  std::mutex mu_;
  UniqueFd fd_;
  io_uring ring_{};
  bool ring_ready_ = false;
  std::chrono::milliseconds timeout_{0};
  uint64_t seq_ = 0;  // user_data of the last command; stale CQEs are skipped
};

// "Live", "Quiesced", "Dead" (UBLK_S_DEV_*), else "Unknown".
const char* UblkStateName(int state);

}  // namespace rpoint
