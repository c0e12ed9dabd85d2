// PointWriter: builds one disk restore point from the slots that changed.
//
// The restore-point job walks the disk's frozen change bitmap and calls put()
// for each changed chunk slot (from a few threads if it likes), then commit().
// Slots never put inherit the parent's content; without a parent they are
// holes, as are slots added by growing the disk. All-zero data and put_hole()
// (a trimmed chunk) make the slot a hole: nothing is written for it.
//
// Cost follows the change, not the disk. put() hashes outside any lock, then
// deduplicates (this writer's open packs, then the region's chunk index) and
// appends new chunks to the writer's pack. Changed leaf pages are kept in
// memory up to writer_leaf_cache_bytes and spill to an unlinked scratch file
// beyond that, so memory stays bounded even for a full point of a huge disk.
// commit() rewrites only the pages above changed leaves, level by level, each
// starting from the parent's page at the same place (shared subtrees are left
// alone): O(changed slots x depth) time, I/O and memory.
//
// Durability and GC: see store.h. Until commit() returns the point does not
// exist; destroying the writer (or abandon()) leaves at most unreferenced,
// indexed objects that the next GC frees.
//
// Full packs are sealed (fdatasync, rename, indexed in one transaction) by
// the writer's own sealer thread, in the background, at most a few queued;
// commit() waits for them before it indexes the last pack with the record.
//
// Thread-safety: put(), put_many() and put_hole() may be called from several
// threads at once (different slots; a slot put twice keeps one of the two). commit() and
// abandon() must not overlap any put().
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "store/pack.h"
#include "store/store.h"
#include "store/tree.h"

namespace rpoint::store {

class PointWriter {
 public:
  ~PointWriter();
  PointWriter(const PointWriter&) = delete;
  PointWriter& operator=(const PointWriter&) = delete;

  uint64_t size() const { return params_.size; }
  uint32_t chunk_size() const { return params_.chunk_size; }
  uint64_t slots() const { return slots_; }
  // Bytes put() expects for `slot`: chunk_size, or less for the disk's last slot.
  uint32_t slot_bytes(uint64_t slot) const;

  // Sets the content of one chunk slot. `len` must be slot_bytes(slot) (for
  // the last slot anything up to chunk_size: bytes past the disk end are
  // ignored). Data is copied; the buffer may be reused once put() returns.
  Status put(uint64_t slot, const void* data, size_t len);
  // put() for n slots at once: slot slots[i] takes slot_bytes(slots[i]) bytes
  // at data + i * chunk_size(). Hashing runs outside every lock as put()'s;
  // the dedup lookups of the whole batch are one index query and the appends
  // one critical section, so the copier pays per batch, not per chunk.
  Status put_many(const uint64_t* slots, size_t n, const char* data);
  // The slot reads as zeroes and is stored as a hole (trimmed or zeroed).
  Status put_hole(uint64_t slot);
  // Names chunk `d` at `slot` without its data, if this store holds it (a
  // copy of a point from another region: only chunks the target lacks are
  // moved). NotFound when the store lacks it (then put() the data); the
  // writer stays usable. The reference is recorded for the GC as put()'s is.
  Status put_known(uint64_t slot, const Digest& d);
  // Seals and indexes the pack being filled now (if any), as a full pack is:
  // the chunks put so far become durable objects of the store even if this
  // writer never commits. A long copy calls it now and then so that, after a
  // crash, its next attempt finds them (until a GC collects them).
  Status seal_pack();

  // Makes the point durable and returns its record. The writer is spent.
  Result<PointInfo> commit();
  // Drops the point being built (also what the destructor does).
  void abandon();

 private:
  friend class Store;
  using DigestSet = std::unordered_set<Digest, DigestHash>;

  PointWriter(std::shared_ptr<Store> store, PointParams params, std::optional<PointRecord> parent);

  // One slot's new content: a digest (zero: a hole) and, for put(), its data.
  struct Item {
    uint64_t slot;
    Digest d;
    const void* data;
    size_t len;
  };
  Status put_items(const Item* items, size_t n);
  // Dedups and, when new, appends `d` to the open pack; records the reference.
  // Caller holds store_->gc_mu_ (shared) and mu_. `indexed`: what an index
  // lookup made under the same gc_mu_ hold said, when the caller made one
  // (trusted unless a pack left sealing_ since: seal_epoch_ != `epoch`). A
  // pack that became full goes to the sealer thread.
  Status store_object_locked(ObjectKind kind, const Digest& d, const void* data, size_t len,
                             size_t stored_len, const std::optional<bool>& indexed = std::nullopt,
                             uint64_t epoch = 0);
  // The sealer thread: seals queued packs in order, then indexes each one.
  void sealer_loop();
  // Waits (mu_ not held) while too many full packs wait for the sealer, so
  // memory stays bounded when the disk is slower than the hashing.
  void wait_seal_room();
  // Waits until every queued pack is sealed and indexed; stops the sealer.
  // With `drop`, queued packs not yet started are discarded instead.
  void stop_sealer(bool drop);
  Status seal_and_index(std::unique_ptr<PackWriter> pack, std::list<DigestSet>::iterator it);
  // Page of the parent tree at (level, index) as seen at this writer's depth.
  Result<std::shared_ptr<const Page>> base_page(uint32_t level, uint64_t index);
  // Caller holds mu_.
  Status evict_locked(uint64_t keep_leaf);
  Status load_spilled_locked(uint64_t leaf, Page* out);
  // Writes one changed page (level >= 1); returns its digest (zero for a hole page).
  Result<Digest> write_page(const Page& p);
  void release();

  std::shared_ptr<Store> store_;
  PointParams params_;
  std::optional<PointRecord> parent_;
  uint64_t slots_ = 0;
  uint32_t depth_ = 1;
  TreeView base_;  // the parent's tree (or empty)

  std::mutex mu_;
  Status failed_;      // first error; every later call returns it
  bool done_ = false;  // committed or abandoned

  std::shared_ptr<BufferPool> buffers_;  // pack write buffers, shared by this writer's packs
  std::unique_ptr<PackWriter> pack_;
  DigestSet pack_digests_;        // objects in pack_ (not yet indexed)
  std::list<DigestSet> sealing_;  // objects in packs queued for or being sealed
  // Full packs the sealer thread makes durable and indexes (fdatasync, rename,
  // the index transaction) while put() threads go on hashing and appending:
  // no copier ever waits for a sync unless the queue is full.
  struct ToSeal {
    std::unique_ptr<PackWriter> pack;
    std::list<DigestSet>::iterator it;
  };
  std::deque<ToSeal> seal_queue_;
  size_t sealing_busy_ = 0;  // queued + being sealed
  uint64_t seal_epoch_ = 0;  // bumped whenever a pack leaves sealing_
  bool sealer_stop_ = false;
  std::condition_variable seal_cv_;
  std::thread sealer_;
  std::map<uint64_t, std::unique_ptr<Page>> resident_;  // changed leaves in memory
  std::unordered_set<uint64_t> spilled_;                // changed leaves in scratch_
  UniqueFd scratch_;
  size_t max_resident_ = 0;
  Store::WriterRefs refs_;
  bool registered_ = false;

  uint64_t new_chunks_ = 0;
  uint64_t new_chunk_bytes_ = 0;
  uint64_t new_pages_ = 0;
  uint64_t put_slots_ = 0;
};

}  // namespace rpoint::store
