// BlockingWorker: a few threads that run a device's blocking syscalls for the
// reactors, so no reactor thread ever waits in one.
//
// Some requests have no non-blocking form here: ext4 refuses IOCB_NOWAIT for
// buffered writes (pwritev2(RWF_NOWAIT) fails with EOPNOTSUPP), so a copy into
// the page cache may sleep in dirty throttling, the journal or a page fault;
// lseek(SEEK_DATA) waits for the inode lock a writer holds. io_uring would
// punt such writes to io-wq, which runs the writes to one inode one at a time
// on one worker and hands each back separately; the inode lock serialises them
// anyway. These threads do the same job with less overhead: a reactor queues
// (request, function) pairs without a syscall while the workers are busy, a
// worker runs a batch of what is queued back to back and hands the results to
// each submitting reactor in one post() per batch, where each runs as the
// request's ring completion (IoRequest::complete, so the device continues it
// as usual). More than one thread: a request that sleeps (a page fault, dirty
// throttling) does not hold up the ones behind it, and large writes overlap
// their copies where the filesystem allows.
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

class BlockingWorker {
 public:
  BlockingWorker(std::string name, unsigned threads);
  ~BlockingWorker();
  BlockingWorker(const BlockingWorker&) = delete;
  BlockingWorker& operator=(const BlockingWorker&) = delete;

  // Runs fn() on the worker thread; its result (bytes or -errno) then reaches
  // req.complete() on `reactor`'s loop thread, as a CQE's would.
  void submit(Reactor& reactor, IoRequest& req, std::function<int()> fn);

 private:
  struct Job {
    Reactor* reactor;
    IoRequest* req;
    std::function<int()> fn;
  };
  void loop();

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
