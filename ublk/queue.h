// UblkQueue: one I/O queue of a ublk device, served on a Reactor of its own.
//
// The queue's thread is the queue's Reactor loop (the kernel wants every
// command of a queue from one task): it registers /dev/ublkcN as a fixed file,
// sends FETCH_REQ for every tag, and for each request the kernel hands back
// (a CQE of that tag's command) reads the tag's I/O descriptor from the
// read-only mapping, turns it into an IoRequest on the disk's BlockDevice
// (submitted on this same reactor, so change tracking, copy-before-write and
// cuts are the engine's, exactly as under NBD), and when the engine completes
// it sends COMMIT_AND_FETCH_REQ with the result. ublksrv_io_cmd is 16 bytes,
// so these are ordinary 64-byte SQEs on the reactor's ring. Nothing on the
// queue's thread blocks.
//
// Data: in buffer mode the driver copies a request's pages into the tag's
// buffer (writes, before the CQE) or out of it (reads, inside the commit), in
// this queue's task: one CPU copies every byte of the queue. With user copy
// (UBLK_F_USER_COPY, 6.5+) the commands carry no buffer and the queue copies
// itself, as ring reads and writes on /dev/ublkcN at UblkUserCopyPos(): the
// char device has no FMODE_NOWAIT, so io_uring runs them on its io-wq
// workers, on any CPU, several requests' copies beside each other and beside
// the backing I/O. With zero copy (UBLK_F_AUTO_BUF_REG, 6.16+) the ring has
// a sparse fixed-buffer table of `depth` entries; every command asks the
// driver to register its next request's pages at the tag's own index, and
// the engine reads and writes them in place (IoRequest::fixed_buf, READ_FIXED
// / WRITE_FIXED): no copy at all. The commit unregisters them.
//
// Thread-safety: Create/start/drain_and_stop from a control thread, once
// each, in that order; everything else runs on the queue's thread.
#pragma once

#include <linux/ublk_cmd.h>
#include <sched.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "common/status.h"
#include "engine/block_device.h"
#include "engine/reactor.h"

namespace rpoint {

struct UblkQueueOptions {
  uint32_t dev_id = 0;
  uint16_t q_id = 0;
  uint16_t depth = 128;
  uint32_t max_io_bytes = 1024 * 1024;  // the device's max_io_buf_bytes
  int char_fd = -1;                     // /dev/ublkcN, owned by the device
  bool user_copy = false;               // the device has UBLK_F_USER_COPY
  bool auto_buf_reg = false;            // the device has UBLK_F_AUTO_BUF_REG (zero copy)
  // How the queue's ring runs task work (the driver's dispatch of each
  // request and its commit run as task work of the queue's thread).
  Reactor::RingMode ring_mode = Reactor::RingMode::kPlain;
  // The queue's thread runs only on these CPUs (the ones whose requests
  // blk-mq sends to this queue), when `pin`.
  bool pin = false;
  cpu_set_t cpus{};
};

// Where queue q's descriptors are mapped in /dev/ublkcN: the driver spaces the
// queues by the largest possible array (UBLK_MAX_QUEUE_DEPTH descriptors,
// rounded up to pages), whatever the depth (ublk_ch_mmap in the kernel).
uint64_t UblkDescOffset(uint16_t q_id);
// Length of the mapping: depth descriptors rounded up to whole pages.
size_t UblkDescBytes(uint16_t depth);

class UblkQueue {
 public:
  static Result<std::unique_ptr<UblkQueue>> Create(const UblkQueueOptions& opts,
                                                   std::shared_ptr<BlockDevice> dev);
  ~UblkQueue();  // drain_and_stop() if still running; unmaps
  UblkQueue(const UblkQueue&) = delete;
  UblkQueue& operator=(const UblkQueue&) = delete;

  // Starts the thread: fixed file, then FETCH_REQ for every tag.
  void start();
  // No new request is taken; the ones handed to the engine finish (and are
  // committed); then the loop ends and the thread is joined. Requests the
  // kernel still holds stay there (a device with USER_RECOVERY requeues them
  // for the next server). Waits at most `timeout_ms` for the engine.
  void drain_and_stop(int timeout_ms = 10000);
  // A command failed in a way that stops the queue (logged once).
  bool failed() const { return failed_.load(); }
  // The ring mode the kernel accepted (opts.ring_mode or a weaker one).
  Reactor::RingMode ring_mode() const { return reactor_->mode(); }

 private:
  struct Tag;
  UblkQueue(const UblkQueueOptions& opts, std::shared_ptr<BlockDevice> dev);
  void issue_cmd(Tag& t, uint32_t op, int result);
  void on_cmd(Tag& t, int res);
  void on_io_done(Tag& t, int result);
  // User copy: the tag's data between its buffer and the request.
  void issue_copy(Tag& t);
  void on_copy(Tag& t, int res);
  // Hands the request to the engine / answers it (the end of its time here).
  void submit_to_engine(Tag& t);
  void commit(Tag& t, int result);

  UblkQueueOptions opts_;
  std::shared_ptr<BlockDevice> dev_;
  std::unique_ptr<Reactor> reactor_;
  std::thread thread_;
  const ublksrv_io_desc* descs_ = nullptr;  // read-only mapping
  size_t descs_len_ = 0;
  char* bufs_ = nullptr;  // depth * max_io_bytes, page aligned
  std::vector<std::unique_ptr<Tag>> tags_;
  bool draining_ = false;          // queue thread only
  std::atomic<int> in_engine_{0};  // requests handed to the BlockDevice
  std::atomic<bool> failed_{false};
  bool started_ = false;
};

}  // namespace rpoint
