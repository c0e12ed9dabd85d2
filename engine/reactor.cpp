#include "engine/reactor.h"

#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/thread_role.h"

// Debian 12's 6.1 UAPI header has these; older ones may not.
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

namespace rpoint {

namespace {

unsigned ModeFlags(Reactor::RingMode mode) {
  switch (mode) {
    case Reactor::RingMode::kPlain:
      return 0;
    case Reactor::RingMode::kCoop:
      return IORING_SETUP_COOP_TASKRUN;
    case Reactor::RingMode::kDefer:
      return IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
             IORING_SETUP_R_DISABLED;
  }
  return 0;
}

Reactor::RingMode Weaker(Reactor::RingMode mode) {
  return mode == Reactor::RingMode::kDefer ? Reactor::RingMode::kCoop : Reactor::RingMode::kPlain;
}

}  // namespace

// Keeps one read armed on the eventfd that post()/stop() write to.
class Reactor::WakeOp final : public Reactor::Op {
 public:
  explicit WakeOp(Reactor* r) : r_(r) {}
  void complete(int, uint32_t) override { r_->arm_wakeup(); }

 private:
  Reactor* r_;
};

Reactor::Reactor(std::string name) : name_(std::move(name)) {}

Result<std::unique_ptr<Reactor>> Reactor::Create(std::string name, unsigned queue_depth,
                                                 RingMode mode) {
  std::unique_ptr<Reactor> r(new Reactor(std::move(name)));
  for (;;) {
    io_uring_params params{};
    // The kernel sizes the CQ at twice the SQ by default; ask for more so bursts of
    // completions (many requests finishing at once) never overflow.
    params.flags = IORING_SETUP_CQSIZE | ModeFlags(mode);
    params.cq_entries = queue_depth * 4;
    int rc = io_uring_queue_init_params(queue_depth, &r->ring_, &params);
    // An older kernel refuses flags it does not know: fall back a mode.
    if (rc == -EINVAL && mode != RingMode::kPlain) {
      mode = Weaker(mode);
      continue;
    }
    if (rc < 0) return Status::FromErrno(-rc, "io_uring_queue_init");
    break;
  }
  r->ring_ready_ = true;
  r->mode_ = mode;
  r->ring_disabled_ = mode == RingMode::kDefer;
  r->wake_fd_.reset(eventfd(0, EFD_CLOEXEC));
  if (!r->wake_fd_) return Status::FromErrno(errno, "eventfd");
  r->wake_op_ = std::make_unique<WakeOp>(r.get());
  r->arm_wakeup();
  return r;
}

Reactor::~Reactor() {
  if (ring_ready_) io_uring_queue_exit(&ring_);
}

io_uring_sqe* Reactor::sqe(Op* op) {
  io_uring_sqe* s = io_uring_get_sqe(&ring_);
  while (s == nullptr) {
    io_uring_submit(&ring_);
    s = io_uring_get_sqe(&ring_);
  }
  io_uring_sqe_set_data(s, op);
  return s;
}

void Reactor::arm_wakeup() {
  io_uring_sqe* s = sqe(wake_op_.get());
  io_uring_prep_read(s, wake_fd_.get(), &wake_buf_, sizeof(wake_buf_), 0);
}

void Reactor::post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(posted_mu_);
    posted_.push_back(std::move(fn));
  }
  uint64_t one = 1;
  // A full eventfd counter (impossible in practice) would still leave it readable.
  [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
}

void Reactor::stop() {
  stopping_.store(true);
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
}

void Reactor::run_posted() {
  std::vector<std::function<void()>> batch;
  {
    std::lock_guard<std::mutex> lock(posted_mu_);
    batch.swap(posted_);
  }
  for (auto& fn : batch) fn();
}

void Reactor::at_idle(IdleHook* hook) {
  // Rarely more than one or two hooks an iteration: a scan beats a set.
  for (IdleHook* h : idle_hooks_) {
    if (h == hook) return;
  }
  idle_hooks_.push_back(hook);
}

void Reactor::run_idle_hooks() {
  if (idle_hooks_.empty()) return;
  // Hooks armed while these run belong to the next iteration. Swapping two
  // vectors keeps their capacity: no allocation in the steady state.
  running_hooks_.swap(idle_hooks_);
  for (IdleHook* h : running_hooks_) h->before_wait();
  running_hooks_.clear();
}

void Reactor::run() {
  loop_thread_.store(std::this_thread::get_id());
  if (ring_disabled_) {
    // Enabling makes this thread the ring's single issuer. liburing 2.3
    // declares io_uring_enable_rings but does not export it: the raw call.
    long rc =
        ::syscall(__NR_io_uring_register, ring_.ring_fd, IORING_REGISTER_ENABLE_RINGS, nullptr, 0);
    if (rc < 0) {
      spdlog::critical("reactor {}: enabling the ring: {}", name_, std::strerror(errno));
      return;
    }
    ring_disabled_ = false;
  }
  SetReactorThread(true);  // debug builds check that nothing here blocks
  constexpr unsigned kBatch = 128;
  io_uring_cqe* cqes[kBatch];
  struct Done {
    Op* op;
    int res;
    uint32_t flags;
  } done[kBatch];
  run_posted();
  while (!stopping_.load(std::memory_order_relaxed)) {
    run_idle_hooks();
    int rc = io_uring_submit_and_wait(&ring_, 1);
    if (rc < 0 && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN) {
      spdlog::critical("reactor {}: io_uring_submit_and_wait: {}", name_, std::strerror(-rc));
      break;
    }
    for (;;) {
      // Copy the CQEs out before running callbacks: a callback may submit, and
      // submitting may need the CQ space these entries hold.
      unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, kBatch);
      if (n == 0) break;
      for (unsigned i = 0; i < n; ++i) {
        done[i] = {static_cast<Op*>(io_uring_cqe_get_data(cqes[i])), cqes[i]->res, cqes[i]->flags};
      }
      io_uring_cq_advance(&ring_, n);
      for (unsigned i = 0; i < n; ++i) {
        if (done[i].op) done[i].op->complete(done[i].res, done[i].flags);
      }
      if (n < kBatch) break;
    }
    run_posted();
  }
  // Give posted work (e.g. shutdown messages) a last chance to run.
  run_posted();
  run_idle_hooks();
  SetReactorThread(false);
}

const char* RingModeName(Reactor::RingMode mode) {
  switch (mode) {
    case Reactor::RingMode::kPlain:
      return "plain";
    case Reactor::RingMode::kCoop:
      return "coop";
    case Reactor::RingMode::kDefer:
      return "defer";
  }
  return "?";
}

Result<std::unique_ptr<ReactorPool>> ReactorPool::Create(unsigned threads, unsigned queue_depth) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  std::unique_ptr<ReactorPool> pool(new ReactorPool());
  for (unsigned i = 0; i < threads; ++i) {
    auto r = Reactor::Create("reactor-" + std::to_string(i), queue_depth);
    if (!r.ok()) return r.status();
    pool->reactors_.push_back(std::move(r).value());
  }
  for (auto& r : pool->reactors_) {
    Reactor* raw = r.get();
    pool->threads_.emplace_back([raw] {
      pthread_setname_np(pthread_self(), raw->name().substr(0, 15).c_str());
      raw->run();
    });
  }
  return pool;
}

Reactor& ReactorPool::next() {
  return *reactors_[next_.fetch_add(1, std::memory_order_relaxed) % reactors_.size()];
}

void ReactorPool::stop_and_join() {
  for (auto& r : reactors_) r->stop();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

ReactorPool::~ReactorPool() {
  stop_and_join();
}

}  // namespace rpoint
