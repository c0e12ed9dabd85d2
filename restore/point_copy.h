// CopyDiskPoint: copies one disk point of a store into a target that may
// already hold part of its content (a collection of the same VM in another
// region; later, another host). Incremental by content: for each data slot
// of the source tree the target is asked whether it holds that chunk (by
// SHA-256 digest); only chunks it lacks are read and moved. With a base (the
// target's own earlier point of the disk, the previous copy) the target
// starts from the base's tree and the two trees are compared digest by
// digest first (PointReader::changed_extents, as the rpoint:changed context
// does): only the slots that differ are looked up and moved, so the cost of
// a copy follows the size of the change, not of the disk. Every chunk moved
// is read through PointReader, which re-hashes it against the digest the tree
// names (a damaged chunk fails the copy loudly, never reaches the target), and
// the target checks the hash again as it takes it.
//
// ChunkTarget is the seam for other targets: a local store (StoreChunkTarget,
// here) or a peer over the network, which needs only "do you have these
// digests?" and "take this chunk". The copy exists in the target only once
// commit() returns; abandon() (or a crash) leaves at most unreferenced
// objects there, for its next GC. checkpoint() (every CopyOptions::
// checkpoint_bytes moved) makes the chunks moved so far durable in the
// target, so a copy killed mid-way and run again moves only the rest.
//
// Thread-safety: one copy per ChunkTarget; CopyProgress is read from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "common/status.h"
#include "store/point_reader.h"
#include "store/point_writer.h"
#include "store/store.h"

namespace rpoint {

class ChunkTarget {
 public:
  virtual ~ChunkTarget() = default;
  // Which of `chunks` the target holds, one flag each. Advisory: reuse()
  // decides for good.
  virtual Result<std::vector<bool>> has(const std::vector<store::Digest>& chunks) = 0;
  // `slot` names chunk `d`, held by the target: Ok, or NotFound when it lacks
  // it after all (then put() it).
  virtual Status reuse(uint64_t slot, const store::Digest& d) = 0;
  // `slot` gets `len` bytes of data that must hash to `d` (IoError if not).
  virtual Status put(uint64_t slot, const store::Digest& d, const void* data, size_t len) = 0;
  // `slot` reads as zeroes (only with a base: a slot the base holds that the
  // source does not).
  virtual Status put_hole(uint64_t slot) {
    return Status::Unsupported("this copy target cannot punch slot " + std::to_string(slot));
  }
  // Makes the chunks put so far durable in the target (not yet a point).
  virtual Status checkpoint() { return Status::Ok(); }
  virtual Result<store::PointInfo> commit() = 0;
  virtual void abandon() = 0;
};

// A disk point being written into a store of this host.
class StoreChunkTarget final : public ChunkTarget {
 public:
  static Result<std::unique_ptr<StoreChunkTarget>> Begin(std::shared_ptr<store::Store> st,
                                                         const store::PointParams& params);
  Result<std::vector<bool>> has(const std::vector<store::Digest>& chunks) override;
  Status reuse(uint64_t slot, const store::Digest& d) override;
  Status put(uint64_t slot, const store::Digest& d, const void* data, size_t len) override;
  Status put_hole(uint64_t slot) override;
  Status checkpoint() override;
  Result<store::PointInfo> commit() override;
  void abandon() override;

 private:
  StoreChunkTarget(std::shared_ptr<store::Store> st, std::unique_ptr<store::PointWriter> w)
      : store_(std::move(st)), writer_(std::move(w)) {}
  std::shared_ptr<store::Store> store_;
  std::unique_ptr<store::PointWriter> writer_;
};

struct CopyProgress {
  std::atomic<uint64_t> slots_total{0};  // data slots of the source point
  std::atomic<uint64_t> slots_done{0};
  std::atomic<uint64_t> chunks_moved{0};
  std::atomic<uint64_t> bytes_moved{0};  // chunk bytes sent to the target
  std::atomic<uint64_t> chunks_reused{0};
  std::atomic<uint64_t> chunks_looked_up{0};  // digests asked of ChunkTarget::has()
  std::atomic<uint64_t> checkpoints{0};
};

struct CopyOptions {
  // The target's earlier point of the same disk (chunk size equal, size not
  // larger), whose tree `dst` was begun from (PointParams::parent): only
  // slots whose digest differs from it are visited. Null: every data slot.
  store::PointReader* base = nullptr;
  // checkpoint() after this many bytes moved since the last one (0: never);
  // then on_checkpoint (the caller records its progress).
  uint64_t checkpoint_bytes = 16ull << 20;
  std::function<void()> on_checkpoint;
};

// Appends the slots that bytes [offset, offset + length) touch to `runs`
// ([first slot, end slot), ascending; a run sharing or adjoining the last one
// merges into it). Ranges must come in ascending order. Returns the number of
// slots added. The copies (here and restore/peer_jobs.cpp) turn extents into
// slot runs with it.
uint64_t AddSlotRun(std::vector<std::pair<uint64_t, uint64_t>>* runs, uint64_t offset,
                    uint64_t length, uint32_t chunk_size);

// Copies every data slot of `src` (with a base: every slot that differs from
// it) into `dst` and commits. `stop` is asked between chunks; true abandons
// the copy (Shutdown).
Result<store::PointInfo> CopyDiskPoint(store::PointReader& src, ChunkTarget& dst,
                                       CopyProgress& progress, const std::function<bool()>& stop,
                                       const CopyOptions& opts = {});

}  // namespace rpoint
