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
// kBlockStatus request runs it, and any further metadata contexts the
// request carries (rpoint:changed:..., tree diffs), on the resolver thread
// and posts the answer back. Debug builds abort if SQLite or a pack/page read ever runs on a
// reactor thread (common/thread_role.h).
//
// Every chunk is read whole and its SHA-256 checked when the reads complete
// (on the reactor: ~40 us per 64 KiB with SHA-NI); a chunk covered only in
// part (the first and last of a request) is read into a bounce buffer. A
// chunk that fails its checksum, or is missing from the store, fails the read
// with EIO, never wrong bytes; a damaged one is quarantined (on the resolver
// thread: SQLite) and its leaf dropped from the cache, so once a later point
// stores a fresh copy the next read resolves to it and succeeds.
//
// Writes, trims and write-zeroes fail with EPERM; flush succeeds (nothing to
// flush).
//
// Lifetime: transports hold a BlockDevice::Use while requests are in flight,
// which keeps the device (and its resolver thread) alive until they complete.
// Pack files: a cached leaf names packs by id only, so an idle export holds
// no descriptor. Each read pins handles on the packs it reads from (the
// store's PackCache, pack_cache.h) from before its SQEs are queued until its
// completion is checked, so no fd is closed (and reused) under a queued SQE;
// GC unlinking a pack does not disturb a pinned one. The reactor only takes
// packs that are open already (PackCache::try_get, no syscall); otherwise the
// request goes to the resolver thread, which opens them. A cached leaf whose
// pack GC has removed is dropped and resolved afresh.
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
    enum State : uint8_t { kHole, kData, kMissing };  // kMissing: not in the store
    State state = kHole;
    uint64_t offset = 0;
    uint64_t pack = 0;
    Digest digest;
  };
  struct Leaf {
    std::array<Slot, kFanout> s;
  };
  using LeafRef = std::shared_ptr<const Leaf>;
  // Handles on the packs one request reads (a few: a linear scan finds them).
  using Pins = std::vector<std::shared_ptr<PackFd>>;
  struct Job {
    Reactor* reactor = nullptr;
    IoRequest* req = nullptr;
  };
  // A chunk of an in-flight read, checked when the request's reads are done.
  struct Check {
    uint64_t slot;
    const Slot* s;        // lives in `leaves` of the ReadState
    const char* data;     // the whole chunk as read
    char* dst = nullptr;  // partial chunk: where [from, from+len) goes
    uint64_t from = 0, len = 0;
  };
  struct ReadState {
    std::vector<LeafRef> leaves;
    Pins pins;  // released when the reads are checked
    std::vector<Check> checks;
    std::vector<std::unique_ptr<char[]>> bounce;
    uint64_t expect = 0;  // bytes zero-filled or read (bounce buffers included)
  };
  struct Damaged {
    uint64_t leaf;
    uint64_t slot;
    Slot s;
  };

  PointDevice(std::shared_ptr<PointReader> reader, std::string name, size_t cache_leaves);
  // Leaves covering req, all from the cache, or false.
  bool cached_leaves(const IoRequest& req, std::vector<LeafRef>* out);
  // A leaf from the cache or resolved now; a fresh one adds its packs' handles to pins.
  Result<LeafRef> resolve_leaf(uint64_t leaf, Pins* pins);
  // Adds to pins a handle on every pack the request's data slots name.
  // open=false (reactor): only packs open now. Returns false when one could
  // not be had (not open; or, with open, removed by GC: the leaves are stale).
  bool pin_packs(const IoRequest& req, const std::vector<LeafRef>& leaves, bool open, Pins* pins);
  void resolver_loop();
  void answer_block_status(const Job& job);
  void issue(Reactor& reactor, IoRequest& req, const std::vector<LeafRef>& leaves, Pins pins);
  void finish_async(Reactor& reactor, IoRequest& req, int err);
  void finish(IoRequest& req);
  // Checks the chunks of a completed read; false on damage (queued for the resolver).
  bool check(IoRequest& req);
  void drop_leaf(uint64_t leaf);

  std::shared_ptr<PointReader> reader_;
  std::string name_;
  size_t cache_cap_;

  std::mutex mu_;  // leaf cache
  std::list<uint64_t> lru_;
  std::unordered_map<uint64_t, std::pair<LeafRef, std::list<uint64_t>::iterator>> cache_;

  std::mutex jobs_mu_;
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  std::deque<Damaged> damaged_;  // to quarantine, on the resolver thread

  std::mutex states_mu_;
  std::unordered_map<IoRequest*, std::unique_ptr<ReadState>> states_;
  bool stopping_ = false;
  std::thread resolver_;
  std::atomic<uint64_t> slow_{0};
};

}  // namespace rpoint::store
