// Reactor: one io_uring and the event loop that drains it, owned by one thread.
//
// Every data-path component (NBD connections, later ublk queues) runs as a
// state machine on a Reactor: it takes SQEs with sqe(), points user_data at a
// Reactor::Op, and gets Op::complete() back on the loop thread. Socket and file
// I/O share the ring, so one thread keeps many requests in flight.
//
// Thread-safety: sqe(), run() and everything reached from Op::complete() belong
// to the loop thread. post() and stop() may be called from any thread; they are
// how the control plane talks to the data path (by message, never by a lock the
// loop would wait on).
#pragma once

#include <liburing.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"

namespace rpoint {

class Reactor {
 public:
  // A pending ring operation. sqe->user_data holds an Op*; its complete() runs
  // on the loop thread with the CQE's res (bytes or -errno) and flags.
  class Op {
   public:
    virtual void complete(int res, uint32_t cqe_flags) = 0;

   protected:
    ~Op() = default;
  };

  // How the ring runs task work: the completions the kernel finishes in the
  // loop thread's own context (ublk's request dispatch and commit, O_DIRECT
  // completions, poll wakeups).
  enum class RingMode {
    // The kernel interrupts the thread for each (an IPI when it runs
    // elsewhere), whatever it is doing.
    kPlain,
    // IORING_SETUP_COOP_TASKRUN (5.19+): no interrupt; task work runs the
    // next time the thread enters the kernel.
    kCoop,
    // IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN (6.1+), with COOP: task
    // work waits until the loop thread asks for completions
    // (io_uring_enter with GETEVENTS, which run() does every iteration) and
    // runs there in one batch. The ring is made disabled (R_DISABLED) and
    // enabled by run(), so the loop thread is its single issuer whichever
    // thread created it; until run() starts only io_uring_register (fixed
    // files) and sqe() may touch it.
    kDefer,
  };

  // `mode` is what the caller wants; a kernel that refuses its flags
  // (EINVAL) gets the next weaker mode, down to kPlain (mode() says which).
  static Result<std::unique_ptr<Reactor>> Create(std::string name, unsigned queue_depth,
                                                 RingMode mode = RingMode::kPlain);
  ~Reactor();
  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  // A free SQE, with user_data already pointing at `op` (nullptr: a CQE that is
  // ignored). Never returns nullptr: when the SQ is full, it submits first.
  // Loop thread only. The SQE is submitted on the next loop iteration.
  io_uring_sqe* sqe(Op* op);

  // Something to run once at the end of the current loop iteration, just
  // before the thread submits its SQEs and sleeps (e.g. waking a helper thread
  // once for everything the iteration queued to it, instead of once per
  // request). Loop thread only; the same hook armed twice in one iteration
  // runs once; one armed while hooks run, in the next iteration. The hook
  // must outlive the iteration.
  class IdleHook {
   public:
    virtual void before_wait() = 0;

   protected:
    ~IdleHook() = default;
  };
  void at_idle(IdleHook* hook);

  // Runs the loop on the calling thread until stop(); that thread becomes the loop thread.
  void run();
  // Runs fn on the loop thread soon. Any thread; safe before run() starts.
  void post(std::function<void()> fn);
  // Makes run() return after the current iteration. Any thread.
  void stop();
  bool in_loop_thread() const { return std::this_thread::get_id() == loop_thread_.load(); }
  const std::string& name() const { return name_; }
  io_uring* ring() { return &ring_; }
  // The mode the kernel accepted.
  RingMode mode() const { return mode_; }

 private:
  class WakeOp;
  Reactor(std::string name);
  void arm_wakeup();
  void run_posted();
  void run_idle_hooks();

  std::string name_;
  io_uring ring_{};
  bool ring_ready_ = false;
  RingMode mode_ = RingMode::kPlain;
  bool ring_disabled_ = false;  // R_DISABLED: run() enables it
  UniqueFd wake_fd_;
  uint64_t wake_buf_ = 0;
  std::unique_ptr<WakeOp> wake_op_;
  std::vector<IdleHook*> idle_hooks_;     // loop thread only
  std::vector<IdleHook*> running_hooks_;  // loop thread only
  std::atomic<bool> stopping_{false};
  std::atomic<std::thread::id> loop_thread_{};
  std::mutex posted_mu_;
  std::vector<std::function<void()>> posted_;
};

// "plain", "coop", "defer" (logs, config).
const char* RingModeName(Reactor::RingMode mode);

// A fixed set of reactors, each on its own thread. Connections are spread
// over them round-robin. Thread-safety: next() is safe from any thread.
class ReactorPool {
 public:
  static Result<std::unique_ptr<ReactorPool>> Create(unsigned threads, unsigned queue_depth);
  ~ReactorPool();  // stops and joins
  Reactor& next();
  size_t size() const { return reactors_.size(); }
  Reactor& at(size_t i) { return *reactors_[i]; }
  void stop_and_join();

 private:
  std::vector<std::unique_ptr<Reactor>> reactors_;
  std::vector<std::thread> threads_;
  std::atomic<size_t> next_{0};
};

}  // namespace rpoint
