// PointDevice: a committed disk point as a read-only BlockDevice, so the NBD
// server (and later ublk) can export a restore point like any disk.
//
// The reactor thread never waits on SQLite or on tree pages. Each request's
// slots are looked up in a per-device cache of resolved leaves (128 slots ->
// pack fd + offset, or hole). On a hit, submit() issues the data reads on the
// reactor's own ring at once (contiguous chunks in one pack become one read;
// holes are zero-filled in place). On a miss, the request goes to the device's
// resolver thread, which walks the tree and the chunk index, fills the cache
// and posts the request back to its reactor to issue the reads there.
// block_status() answers from the tree (whole hole subtrees at once); a
// kBlockStatus request runs it on the resolver thread and posts the answer
// back. Debug builds abort if SQLite or a pack/page read ever runs on a
// reactor thread (common/thread_role.h).
//
// Writes, trims and write-zeroes fail with EPERM; flush succeeds (nothing to
// flush). A chunk that is missing from the store fails the read with EIO.
//
// Lifetime: transports hold a BlockDevice::Use while requests are in flight,
// which keeps the device (and its resolver thread) alive until they complete.
// Pack fds the device reads from stay open for the device's life, so no fd is
// closed under a queued SQE; GC unlinking a pack does not disturb them.
//
// Thread-safety: as BlockDevice (submit from any reactor, concurrently).
#pragma once

#include <array>
#include <condition_variable>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/block_device.h"
#include "store/point_reader.h"

namespace rpoint::store {

class PointDevice final : public BlockDevice {
 public:
  // cache_leaves: resolved leaves kept (2 KiB each; one maps 128 chunk slots).
  static Result<std::shared_ptr<PointDevice>> Create(std::shared_ptr<PointReader> reader,
                                                     std::string name, size_t cache_leaves = 4096);
  ~PointDevice() override;

  const std::string& name() const override { return name_; }
  uint64_t size() const override { return reader_->size(); }
  DeviceCaps caps() const override;
  void submit(Reactor& reactor, IoRequest& req) override;
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length,
                                           size_t max_extents) override;
  void on_completion(Reactor& reactor, IoRequest& req, int res) override;

  const std::shared_ptr<PointReader>& reader() const { return reader_; }
  // Requests that had to wait for the resolver thread (tests, metrics).
  uint64_t slow_path_requests() const { return slow_.load(); }

 private:
  struct Slot {
    int fd = -1;  // -1: hole, -2: missing from the store
    uint64_t offset = 0;
  };
  struct Leaf {
    std::array<Slot, kFanout> s;
  };
  using LeafRef = std::shared_ptr<const Leaf>;
  struct Job {
    Reactor* reactor;
    IoRequest* req;
  };

  PointDevice(std::shared_ptr<PointReader> reader, std::string name, size_t cache_leaves);
  // Leaves covering req, all from the cache, or false.
  bool cached_leaves(const IoRequest& req, std::vector<LeafRef>* out);
  Result<LeafRef> resolve_leaf(uint64_t leaf);
  void resolver_loop();
  void answer_block_status(const Job& job);
  void issue(Reactor& reactor, IoRequest& req, const std::vector<LeafRef>& leaves);
  void finish_async(Reactor& reactor, IoRequest& req, int err);
  void finish(IoRequest& req);

  std::shared_ptr<PointReader> reader_;
  std::string name_;
  size_t cache_cap_;

  std::mutex mu_;  // cache + pack table
  std::list<uint64_t> lru_;
  std::unordered_map<uint64_t, std::pair<LeafRef, std::list<uint64_t>::iterator>> cache_;
  std::unordered_map<uint64_t, std::shared_ptr<PackFd>> packs_;

  std::mutex jobs_mu_;
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  bool stopping_ = false;
  std::thread resolver_;
  std::atomic<uint64_t> slow_{0};
};

}  // namespace rpoint::store
