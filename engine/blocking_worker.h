// BlockingWorker: a few threads that run a device's blocking syscalls for the
// reactors, so no reactor thread ever waits in one.
//
// Some requests have no non-blocking form here: ext4 refuses IOCB_NOWAIT for
// buffered writes (pwritev2(RWF_NOWAIT) fails with EOPNOTSUPP), so a copy into
// the page cache may sleep in dirty throttling, the journal or a page fault;
// lseek(SEEK_DATA) waits for the inode lock a writer holds. io_uring would
// punt such writes to io-wq, which runs the writes to one inode one at a time
// on one worker and hands each back separately; the inode lock serialises them
// anyway. These threads do the same job with less overhead.
//
// What costs is not the copy but the hand-off: a wakeup per request makes the
// reactor and a worker ping-pong on the CPU (the woken worker preempts the
// reactor, takes one request, wakes the reactor, sleeps). So the hand-off is
// batched at both ends:
//  - submit() only queues (a short uncontended lock, no syscall); a worker
//    that is idle is woken once per reactor loop iteration, when the reactor
//    has queued everything that iteration parsed (Reactor::at_idle), and busy
//    workers find new jobs when they look at the queue again;
//  - a worker takes a run of queued jobs (up to kMaxBatch jobs or
//    kMaxBatchBytes of writes, at least one), runs them back to back and
//    hands the results to each submitting reactor in one post() per run,
//    where each runs as the request's ring completion (IoRequest::complete,
//    so the device continues it as usual).
// More than one thread: a request that sleeps (a page fault, dirty
// throttling) does not hold up the ones behind it, and block status is not
// stuck behind large writes.
//
// Thread-safety: submit() from any reactor thread; the destructor from the
// owner once no request is queued (transports keep the device alive while
// their requests are in flight).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/block_device.h"
#include "engine/reactor.h"

namespace rpoint {

class BlockingWorker final : private Reactor::IdleHook {
 public:
  BlockingWorker(std::string name, unsigned threads);
  ~BlockingWorker();
  BlockingWorker(const BlockingWorker&) = delete;
  BlockingWorker& operator=(const BlockingWorker&) = delete;

  // Runs fn() on the worker thread; its result (bytes or -errno) then reaches
  // req.complete() on `reactor`'s loop thread, as a CQE's would. Call on
  // `reactor`'s loop thread: an idle worker is woken at the end of its
  // current iteration.
  void submit(Reactor& reactor, IoRequest& req, std::function<int()> fn);

 private:
  struct Job {
    Reactor* reactor;
    IoRequest* req;
    std::function<int()> fn;
  };
  void loop();
  void before_wait() override;  // Reactor::IdleHook: wake an idle worker

  std::string name_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;   // guarded by mu_
  unsigned idle_ = 0;      // guarded by mu_: workers waiting on cv_
  bool stopping_ = false;  // guarded by mu_
  unsigned nthreads_;
  std::vector<std::thread> threads_;
};

}  // namespace rpoint
