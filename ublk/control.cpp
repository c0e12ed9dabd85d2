#include "ublk/control.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace rpoint {

const char* UblkStateName(int state) {
  switch (state) {
    case UBLK_S_DEV_DEAD:
      return "Dead";
    case UBLK_S_DEV_LIVE:
      return "Live";
    case UBLK_S_DEV_QUIESCED:
      return "Quiesced";
  }
  return "Unknown";
}

std::string UblkControl::UnavailableReason(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) return "";
  return path + " is missing: the kernel module ublk_drv is not loaded (or this kernel has no " +
         "ublk driver, CONFIG_BLK_DEV_UBLK); load it with `modprobe ublk_drv` (ublk disks " +
         "recorded earlier come back at rpointd's next start), or serve the disk over NBD";
}

Result<std::unique_ptr<UblkControl>> UblkControl::Open(const std::string& path,
                                                       std::chrono::milliseconds timeout) {
  std::string why = UnavailableReason(path);
  if (!why.empty()) return Status::Unsupported(why);
  std::unique_ptr<UblkControl> c(new UblkControl());
  c->timeout_ = timeout;
  c->fd_.reset(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!c->fd_) return Status::FromErrno(errno, "open " + path);
  io_uring_params p{};
  p.flags = IORING_SETUP_SQE128;
  int rc = io_uring_queue_init_params(4, &c->ring_, &p);
  if (rc < 0) return Status::FromErrno(-rc, "io_uring_queue_init (SQE128) for " + path);
  c->ring_ready_ = true;
  return c;
}

UblkControl::~UblkControl() {
  if (ring_ready_) io_uring_queue_exit(&ring_);
}

Result<int> UblkControl::run(uint32_t op, uint32_t dev_id, void* buf, uint16_t len, uint64_t data0,
                             const char* what, uint16_t queue_id) {
  std::lock_guard<std::mutex> lock(mu_);
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) return Status::Internal("ublk control ring full");
  // A 128-byte SQE: the first 48 bytes are the normal SQE, cmd[] the other 80.
  std::memset(sqe, 0, 2 * sizeof(*sqe));
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd_.get();
  sqe->cmd_op = op;
  sqe->user_data = ++seq_;
  ublksrv_ctrl_cmd cmd{};
  cmd.dev_id = dev_id;
  cmd.queue_id = queue_id;
  cmd.len = len;
  cmd.addr = reinterpret_cast<uint64_t>(buf);
  cmd.data[0] = data0;
  std::memcpy(sqe->cmd, &cmd, sizeof(cmd));
  int rc = io_uring_submit(&ring_);
  if (rc < 0) return Status::FromErrno(-rc, std::string("ublk ") + what + ": submit");
  auto deadline = std::chrono::steady_clock::now() + timeout_;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::microseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      // The command stays in the kernel; its late CQE is skipped by seq_.
      return Status::IoError(std::string("ublk ") + what + " of device " + std::to_string(dev_id) +
                             ": no answer from the driver within " +
                             std::to_string(timeout_.count()) + " ms");
    }
    __kernel_timespec ts{};
    ts.tv_sec = left.count() / 1000000;
    ts.tv_nsec = (left.count() % 1000000) * 1000;
    io_uring_cqe* cqe = nullptr;
    rc = io_uring_wait_cqe_timeout(&ring_, &cqe, &ts);
    if (rc == -ETIME || rc == -EINTR) continue;
    if (rc < 0) return Status::FromErrno(-rc, std::string("ublk ") + what + ": wait");
    uint64_t ud = cqe->user_data;
    int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (ud != seq_) continue;  // a command that timed out earlier
    if (res == -ENODEV) {
      return Status::NotFound(std::string("ublk ") + what + ": no ublk device " +
                              std::to_string(dev_id));
    }
    if (res < 0) {
      return Status::FromErrno(
          -res, std::string("ublk ") + what + " of device " + std::to_string(dev_id));
    }
    return res;
  }
}

Result<ublksrv_ctrl_dev_info> UblkControl::add_dev(const ublksrv_ctrl_dev_info& info) {
  ublksrv_ctrl_dev_info out = info;
  auto r = run(UBLK_CMD_ADD_DEV, info.dev_id, &out, sizeof(out), 0, "ADD_DEV");
  if (!r.ok()) return r.status();
  return out;
}

Status UblkControl::set_params(uint32_t dev_id, const ublk_params& params) {
  ublk_params p = params;
  p.len = sizeof(p);
  auto r = run(UBLK_CMD_SET_PARAMS, dev_id, &p, sizeof(p), 0, "SET_PARAMS");
  return r.ok() ? Status::Ok() : r.status();
}

Status UblkControl::start_dev(uint32_t dev_id, int pid) {
  auto r = run(UBLK_CMD_START_DEV, dev_id, nullptr, 0, static_cast<uint64_t>(pid), "START_DEV");
  return r.ok() ? Status::Ok() : r.status();
}

Status UblkControl::stop_dev(uint32_t dev_id) {
  auto r = run(UBLK_CMD_STOP_DEV, dev_id, nullptr, 0, 0, "STOP_DEV");
  return r.ok() ? Status::Ok() : r.status();
}

Status UblkControl::del_dev(uint32_t dev_id) {
  auto r = run(UBLK_CMD_DEL_DEV, dev_id, nullptr, 0, 0, "DEL_DEV");
  return r.ok() ? Status::Ok() : r.status();
}

Result<ublksrv_ctrl_dev_info> UblkControl::get_dev_info(uint32_t dev_id) {
  ublksrv_ctrl_dev_info info{};
  auto r = run(UBLK_CMD_GET_DEV_INFO, dev_id, &info, sizeof(info), 0, "GET_DEV_INFO");
  if (!r.ok()) return r.status();
  return info;
}

Status UblkControl::start_user_recovery(uint32_t dev_id) {
  auto r = run(UBLK_CMD_START_USER_RECOVERY, dev_id, nullptr, 0, 0, "START_USER_RECOVERY");
  return r.ok() ? Status::Ok() : r.status();
}

Status UblkControl::end_user_recovery(uint32_t dev_id, int pid) {
  auto r = run(UBLK_CMD_END_USER_RECOVERY, dev_id, nullptr, 0, static_cast<uint64_t>(pid),
               "END_USER_RECOVERY");
  return r.ok() ? Status::Ok() : r.status();
}

Result<uint64_t> UblkControl::get_features() {
  uint64_t features = 0;
  auto r = run(kUblkCmdGetFeatures, static_cast<uint32_t>(-1), &features, sizeof(features), 0,
               "GET_FEATURES");
  if (!r.ok()) return r.status();
  return features;
}

Result<cpu_set_t> UblkControl::get_queue_affinity(uint32_t dev_id, uint16_t q_id) {
  cpu_set_t set;
  CPU_ZERO(&set);
  auto r =
      run(UBLK_CMD_GET_QUEUE_AFFINITY, dev_id, &set, sizeof(set), 0, "GET_QUEUE_AFFINITY", q_id);
  if (!r.ok()) return r.status();
  return set;
}

}  // namespace rpoint
