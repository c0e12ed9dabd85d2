#include "engine/blocking_worker.h"

#include <pthread.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace rpoint {
namespace {

// A worker's run of jobs: bounds how long the first request of a long queue
// waits for its acknowledgement behind the others (64 4 KiB writes take
// ~0.2 ms; one 1 MiB write alone is a run and leaves the next to another
// worker).
constexpr size_t kMaxBatch = 64;
constexpr uint64_t kMaxBatchBytes = 256 << 10;

uint64_t JobBytes(const IoRequest& req) {
  return req.kind == IoKind::kWrite ? req.length - req.done_ : 0;
}

}  // namespace

BlockingWorker::BlockingWorker(std::string name, unsigned threads)
    : name_(std::move(name)), nthreads_(std::max(1u, threads)) {
  for (unsigned i = 0; i < nthreads_; ++i) {
    threads_.emplace_back([this] {
      pthread_setname_np(pthread_self(), name_.substr(0, 15).c_str());
      loop();
    });
  }
}

BlockingWorker::~BlockingWorker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void BlockingWorker::submit(Reactor& reactor, IoRequest& req, std::function<int()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(Job{&reactor, &req, std::move(fn)});
  }
  // The wakeup waits for the end of the reactor's iteration, so every request
  // it parses in one go shares one (and the reactor is not preempted mid-batch).
  reactor.at_idle(this);
}

void BlockingWorker::before_wait() {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Busy workers find the jobs when they look at the queue again: no syscall.
    wake = idle_ > 0 && !jobs_.empty();
  }
  if (wake) cv_.notify_one();
}

void BlockingWorker::loop() {
  std::vector<Job> batch;
  std::vector<std::pair<IoRequest*, int>> done;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    while (jobs_.empty() && !stopping_) {
      ++idle_;
      cv_.wait(lock);
      --idle_;
    }
    if (jobs_.empty()) return;  // stopping, nothing left
    // A run of small jobs, or one large write; idle workers take the rest.
    uint64_t bytes = 0;
    while (!jobs_.empty() && batch.size() < kMaxBatch &&
           (batch.empty() || bytes + JobBytes(*jobs_.front().req) <= kMaxBatchBytes)) {
      bytes += JobBytes(*jobs_.front().req);
      batch.push_back(std::move(jobs_.front()));
      jobs_.pop_front();
    }
    if (!jobs_.empty() && idle_ > 0) cv_.notify_one();
    lock.unlock();
    // Results go back to each job's own reactor, one post() per reactor run,
    // in submission order.
    for (size_t i = 0; i < batch.size();) {
      Reactor* r = batch[i].reactor;
      done.clear();
      for (; i < batch.size() && batch[i].reactor == r; ++i) {
        done.emplace_back(batch[i].req, batch[i].fn());
      }
      r->post([done = std::move(done)] {
        for (auto [req, res] : done) req->complete(res, 0);
      });
      done = {};
    }
    batch.clear();
    lock.lock();
  }
}

}  // namespace rpoint
