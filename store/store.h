// Store: one region's restore point store, a directory of deduplicated,
// content-addressed chunks and the disk image maps that name them.
//
// Layout (docs/store.md has the byte-level format):
//   <dir>/LOCK           flock: one process owns a region at a time
//   <dir>/store.db       SQLite (WAL, synchronous=FULL): chunk index, packs, points
//   <dir>/packs/xx/<id>.pack   pack files, tens of MiB, hundreds of objects each
//   <dir>/points/<id>.point    one small text file per committed point
//   <dir>/manifests/<name>.json  the restore layer's records (opaque here)
//
// Objects are SHA-256-named byte strings of two kinds: data chunks (one chunk
// slot of a disk, size = the disk's tracking granularity) and tree pages (128
// digests, 4 KiB). The all-zero digest means "hole": zero chunks are never
// written, and a subtree that is all holes is one zero entry in its parent.
//
// A disk point is a Merkle tree of pages over the disk's chunk slots
// ("disk image map"): level 0 are the slots' chunk digests, each page holds 128
// digests of the level below, the top page is the root. An incremental point
// rewrites only the pages on the paths from changed slots to the root; every
// other subtree is shared with its parent by digest. So a point's own cost is
// O(changed slots x depth) pages, whatever the disk size, and any point can be
// deleted without touching the others (no chains to rebase).
//
// Write order and crash safety. For each point:
//   1. chunks and pages are appended to the writer's own pack files; a full
//      pack is sealed: trailer, fdatasync, rename from .tmp, fsync of its dir;
//   2. only then do its objects enter the chunk index (one SQLite transaction);
//   3. commit() writes the changed pages bottom-up into the last pack, seals it,
//      and adds that pack's objects AND the point record in one transaction.
// A point record therefore exists only when every object it names is durable
// and indexed. Just before that transaction the point's record is also written
// as <dir>/points/<id>.point (atomically), so the region's files alone describe
// every point (rebuild.h). A crash at any moment leaves earlier points intact:
// Store::Open deletes *.tmp packs (never complete), re-indexes sealed packs the
// index does not know from their trailers (it never deletes one) and imports
// point files the index does not know; objects indexed for a point that never
// committed are garbage for the next GC. A lost or empty store.db is the same
// case at full scale: Open rebuilds it. Files are never overwritten in place (packs are immutable,
// GC writes a new pack and deletes the old one), so no rewrite can tear.
//
// Garbage collection (mark and sweep, concurrent with writers and readers).
// Live = reachable from a point record, from a pinned root (open readers and
// devices; a writer's parent) or referenced by a writer still in progress.
// Each writer keeps the 64-bit digest prefix of every object it referenced
// (new or deduplicated) in `refs`; it appends under gc_mu_ (shared) together
// with the index lookup that decided "exists, reuse it". The GC:
//   a. under gc_mu_ exclusive and reg_mu_: snapshots point roots, pinned
//      roots and all writers' refs at one instant (a commit inserts its record
//      before its writer drops refs and pin: the snapshot sees one of the two),
//      and opens a "late refs" set that every reference made from now on also
//      goes to (gc_active_);
//   b. marks without locks: walks every snapshot root (each page once, shared
//      subtrees are skipped by digest), collecting digest prefixes; below an
//      unreadable page nothing is known, so every object in a pack indexed
//      no later than that page's point is kept (docs/store.md);
//   c. scans the chunk index; unmarked objects are candidates;
//   d. deletes candidates in batches, each under gc_mu_ exclusive after
//      dropping those now in the late refs. A writer's "exists, reuse it" and a
//      batch's delete are thus strictly ordered: either the writer's reference
//      is seen by the batch, or the writer found the row gone and wrote a new
//      copy;
//   e. deletes packs with no indexed object left, and rewrites packs mostly
//      dead (live objects copied into a new sealed pack, index rows moved in
//      one transaction, then the old file unlinked).
// A point committed during a GC is safe: its new objects are in its writer's
// refs (snapshot) or in the late refs, and what it inherits is reachable from
// its parent, which was a snapshot root, pinned, or itself covered the same
// way. Prefix collisions only ever keep garbage alive. Readers that resolved
// a location before a pack was unlinked keep reading through their open fd.
//
// Thread-safety: Store is safe from any thread; several PointWriters (other
// disks, other VMs) run at once; see PointWriter / PointReader for theirs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "store/catalog.h"
#include "store/digest.h"
#include "store/format.h"
#include "store/pack_cache.h"
#include "store/page_cache.h"

namespace rpoint::store {

class PointWriter;
class PointReader;
class TreeView;

struct StoreOptions {
  std::string dir;                             // the region directory (created if missing)
  uint64_t pack_target_bytes = 32ull << 20;    // seal a pack once it holds this much
  size_t pack_buffer_bytes = 4u << 20;         // per open pack: size of each sequential write
  size_t page_cache_bytes = 64u << 20;         // verified tree pages kept in memory
  size_t writer_leaf_cache_bytes = 32u << 20;  // per writer: changed leaf pages in memory
  double repack_below_live = 0.5;              // GC rewrites packs less live than this
  // Open pack files (pack_cache.h). Share one cache among all the process's
  // stores to bound them together (the daemon does: store.open_packs); when
  // null, the store makes its own of `open_packs` entries.
  std::shared_ptr<PackCache> pack_cache = nullptr;
  size_t open_packs = PackCache::kDefaultCapacity;
  // Write pack buffers with O_DIRECT where the filesystem allows it (pack.h):
  // no page-cache copy of what a point stores. Off: every write is buffered.
  bool pack_direct_io = true;
};

// A committed disk point. `id` names it in this region; `root` + `size` +
// `chunk_size` fully describe its content.
using PointInfo = PointRecord;

struct PointParams {
  PointId parent = 0;                       // 0: a full point (no parent)
  uint64_t size = 0;                        // disk size in bytes (>= the parent's)
  uint32_t chunk_size = kDefaultChunkSize;  // must equal the parent's
  std::string tag;                          // caller's label (e.g. the diskRestorePoint id)
};

struct GcOptions {
  bool dry_run = false;  // mark and count only
  // Tests: runs once after the index scan, before anything is deleted, with
  // no store lock held (to put writers exactly into the race GC must win).
  std::function<void()> before_sweep;
};

struct GcStats {
  uint64_t roots = 0;
  uint64_t pages_walked = 0;
  uint64_t objects_scanned = 0;
  uint64_t objects_deleted = 0;
  uint64_t objects_kept_late = 0;     // candidates a concurrent writer referenced
  uint64_t pages_unreadable = 0;      // damaged or missing pages met while marking
  uint64_t objects_kept_unknown = 0;  // kept: possibly below an unreadable page
  uint64_t packs_deleted = 0;
  uint64_t packs_repacked = 0;
  uint64_t pack_bytes_before = 0;
  uint64_t pack_bytes_after = 0;
  double seconds = 0;
};

struct Damage {
  enum class Kind { kPage, kChunk };
  Kind kind = Kind::kChunk;
  Digest digest;
  uint64_t pack = 0;  // 0 when the object is not in the index at all
  uint64_t offset = 0;
  std::string reason;
  uint32_t level = 0;           // pages: tree level (1 = leaf page)
  uint64_t first_slot = 0;      // first chunk slot affected
  uint64_t slot_count = 0;      // slots affected (pages: the range they map)
  std::vector<uint64_t> slots;  // chunks: the slots naming it (at most 64 listed)
};

struct PackProblem {
  uint64_t pack = 0;
  std::string reason;  // bad header, torn or bad footer, trailer checksum mismatch
};

struct VerifyReport {
  PointId id = 0;
  uint64_t pages_checked = 0;
  uint64_t chunks_checked = 0;  // distinct chunks re-read and re-hashed
  uint64_t packs_checked = 0;   // packs whose header and trailer were checked
  uint64_t bytes_read = 0;
  std::vector<Damage> damage;              // objects the point cannot be read without
  std::vector<PackProblem> pack_problems;  // pack framing damage (objects may still be fine)
  std::vector<uint64_t> damaged_packs;     // every pack named above
  bool ok() const { return damage.empty() && pack_problems.empty(); }
};

struct VerifyOptions {
  // Move damaged objects out of the index (into bad_objects): the next point
  // that contains the same data stores a fresh copy, which heals every point
  // naming that digest. Until then reads of the affected slots fail (EIO).
  bool quarantine = false;
};

// What Store::Open or Store::repair() found and did to bring the index in
// line with the region's files (rebuild.h).
struct RepairReport {
  uint64_t packs_on_disk = 0;                 // sealed pack files seen
  uint64_t packs_indexed = 0;                 // unknown to the index, re-indexed from their trailer
  uint64_t objects_indexed = 0;               // index rows those added
  uint64_t tmp_removed = 0;                   // *.pack.tmp / *.point.tmp (never complete) removed
  uint64_t points_imported = 0;               // point files the index did not list
  uint64_t point_files_written = 0;           // records that had no point file
  std::vector<PointId> points_incomplete;     // point files naming objects no pack holds (kept)
  std::vector<PackProblem> packs_unreadable;  // left in place, not indexed
  std::vector<uint64_t> packs_missing;        // indexed, but the file is gone
};

// What Store::delete_unindexed_packs() removed.
struct OrphanReport {
  uint64_t packs_deleted = 0;
  uint64_t bytes_freed = 0;
};

struct StoreStats {
  uint64_t points = 0;
  uint64_t packs = 0;
  uint64_t pack_bytes = 0;  // sum of sealed pack sizes
  uint64_t objects = 0;
};

class Store : public std::enable_shared_from_this<Store> {
 public:
  static Result<std::shared_ptr<Store>> Open(const StoreOptions& opts);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Starts a disk point. The writer pins its parent until commit or abandon.
  Result<std::unique_ptr<PointWriter>> begin_point(const PointParams& p);

  Result<PointInfo> point(PointId id);
  Result<std::vector<PointInfo>> list_points();
  // Removes the record; space returns at the next GC. Any point may go, in any
  // order: children share content by digest, they do not depend on parents.
  // Open readers of it keep working (they pin its root).
  Status delete_point(PointId id);

  Result<std::shared_ptr<PointReader>> open_point(PointId id);

  // Which of `objects` the index holds, one flag each. Advisory (a GC may
  // delete one right after): PointWriter::put_known decides for good.
  Result<std::vector<bool>> has_objects(const std::vector<Digest>& objects);

  // One pass of mark and sweep; safe while writers and readers run.
  Result<GcStats> collect_garbage(const GcOptions& o = {});

  // Re-reads and re-hashes every page and chunk the point references.
  Result<VerifyReport> verify(PointId id, const VerifyOptions& o = {});

  // Slots of point `id` naming a chunk that was found damaged (quarantined by
  // a read or by verify) and has not been stored again since: the next point
  // of that disk must copy them again, even if unchanged, to heal the store.
  // Free while nothing quarantined is unhealed (one index query); else one
  // walk of the point's tree. IoError when a page of the point is unreadable
  // (the caller cannot know those slots: take a full point instead).
  // Every pack file the index names is first checked to be there, at least
  // as long as recorded (check_packs): a pack deleted or cut short on disk
  // is damage found before any read, and healed the same way.
  Result<std::vector<uint64_t>> damaged_slots(PointId id);
  // Packs the index names whose file is missing or shorter than recorded:
  // their objects are quarantined (logged as errors), so dedup never names
  // them again and the next point of each disk copies those blocks afresh.
  // Returns how many objects were quarantined. One stat per pack.
  Result<uint64_t> check_packs();
  struct LostPack {
    uint64_t id;
    std::string why;
  };
  // check_packs in two steps (verify reports the damage in between): the
  // packs found lost, their cached descriptors dropped; then their objects
  // quarantined (caller must NOT hold gc_mu_ for either).
  Result<std::vector<LostPack>> find_lost_packs();
  Result<uint64_t> quarantine_packs(const std::vector<LostPack>& lost);
  // Re-runs Open's reconciliation on the live store: re-indexes sealed packs
  // the index does not know, imports point files it does not list, writes
  // missing point files. Conflict while a point is being written (nothing
  // is changed then). Never deletes a pack or a point.
  Result<RepairReport> repair();
  // The explicit operator action for what the index cannot use: sealed pack
  // files it does not list (unreadable trailers that repair() refused).
  // Conflict while a point is being written. Unreferenced objects in indexed
  // packs are the GC's job (collect_garbage).
  Result<OrphanReport> delete_unindexed_packs();

  // Small documents of the layer above, kept in the region so that it
  // travels with the points it describes (<dir>/manifests/<name>.json,
  // replaced atomically and durably). `name`: [A-Za-z0-9._~-], not starting
  // with '.'.
  Status put_manifest(const std::string& name, const std::string& content);
  Status remove_manifest(const std::string& name);
  // Every manifest: (name, content). A file that cannot be read is logged
  // and skipped.
  Result<std::vector<std::pair<std::string, std::string>>> manifests();

  Result<StoreStats> stats();
  // Ok while the region directory is still the one this store opened: its
  // LOCK file is there and is the file this store holds locked. Unavailable
  // once the directory was removed or replaced (an `rm -rf`, a filesystem
  // mounted over it or unmounted lazily): its points can no longer be read
  // and nothing may be written there. One stat(2); any thread.
  Status check_present() const;
  // Whether `dir` holds a store, or what is left of one (its index, LOCK,
  // packs, point files or manifests): Open on a directory without any of
  // them starts an empty store.
  static bool Exists(const std::string& dir);
  const std::string& dir() const { return opts_.dir; }
  const StoreOptions& options() const { return opts_; }

 private:
  friend class PointWriter;
  friend class PointReader;
  friend class TreeView;

  // What GC must keep for one writer in progress (see the header comment).
  struct WriterRefs {
    std::vector<uint64_t> prefixes;
  };

  explicit Store(StoreOptions opts);
  // Brings the index in line with the region's files (rebuild.h); no writer
  // may be active. at_open: also removes *.tmp leftovers.
  Status reconcile(bool at_open, RepairReport* rep);
  // Every page the point's tree names can be read and every chunk is
  // indexed; `seen` skips subtrees already checked. Caller holds gc_mu_ or
  // runs before any reader exists.
  Status check_complete_locked(const PointRecord& r, std::unordered_set<Digest, DigestHash>* seen);
  Status write_point_file(const PointRecord& r);
  PointId new_point_id() { return next_point_id_.fetch_add(1); }

  // Pages through the cache, verified against their digest when read.
  Result<std::shared_ptr<const Page>> load_page(const Digest& d);
  // Reads a page from its pack, bypassing the cache (GC and verify). A page
  // failing its checksum is quarantined.
  Result<std::shared_ptr<const Page>> read_page_uncached(const Digest& d);
  // A read found the object at `loc` damaged: move it from the index to
  // bad_objects (if the index still names that location), so dedup never
  // reuses it and the next put of the same content stores a fresh copy.
  // Caller must NOT hold gc_mu_. Failures are logged (the read fails anyway).
  void quarantine(const Digest& d, const ObjectLoc& loc, const std::string& why);
  Result<std::shared_ptr<const Page>> read_page_at(const Digest& d, const ObjectLoc& loc,
                                                   const PackFd& fd);
  // Index lookup + open pack, atomic against GC (caller must NOT hold gc_mu_).
  Result<std::optional<std::pair<ObjectLoc, std::shared_ptr<PackFd>>>> locate(const Digest& d);
  // Same, for callers already holding gc_mu_ (shared or exclusive).
  Result<std::shared_ptr<PackFd>> pack_fd_locked(uint64_t pack);
  // The pack if it is open now, else nullptr; no syscall (reactor threads).
  std::shared_ptr<PackFd> open_pack_fd(uint64_t pack) {
    return pack_cache_->try_get(pack_owner_, pack);
  }
  void drop_pack_fd_locked(uint64_t pack);
  uint64_t new_pack_id() { return next_pack_id_.fetch_add(1); }
  const std::string& packs_dir() const { return packs_dir_; }

  // Roots kept alive by readers and writers' parents.
  void pin(const Digest& root, uint32_t depth);
  void unpin(const Digest& root, uint32_t depth);
  void register_writer(WriterRefs* w);
  void unregister_writer(WriterRefs* w);
  // Records a reference by a writer; caller holds gc_mu_ shared.
  void note_ref_locked(WriterRefs* w, const Digest& d);

  Status repack(uint64_t pack, GcStats* stats);

  StoreOptions opts_;
  std::string packs_dir_;
  std::string points_dir_;
  UniqueFd lock_fd_;
  std::unique_ptr<Catalog> catalog_;
  std::atomic<uint64_t> next_pack_id_{1};
  std::atomic<PointId> next_point_id_{1};  // ids are chosen before the point file is written
  PageCache pages_;

  // Lock order: gc_run_mu_ -> gc_mu_ -> (PointWriter::mu_) -> reg_mu_ -> PackCache.
  std::mutex gc_run_mu_;     // one GC / quarantine at a time
  std::shared_mutex gc_mu_;  // see the header comment
  std::mutex reg_mu_;
  struct PinKey {
    Digest root;
    uint32_t depth;
    bool operator==(const PinKey&) const = default;
  };
  struct PinKeyHash {
    size_t operator()(const PinKey& k) const { return k.root.prefix() ^ k.depth; }
  };
  std::unordered_map<PinKey, int, PinKeyHash> pins_;
  std::unordered_set<WriterRefs*> writers_;
  bool gc_active_ = false;
  std::unordered_set<uint64_t> late_refs_;

  std::shared_ptr<PackCache> pack_cache_;
  uint64_t pack_owner_ = 0;  // this store's key in pack_cache_
};

}  // namespace rpoint::store
