// Catalog: the region's SQLite database (store.db): the chunk index
// (digest -> pack, offset, length), the pack list and the disk point records.
// Its connections are db/sqlite.h's, its schema is db/migrations.cpp's
// StoreSchema (applied on Open).
//
// Durability: WAL with synchronous=FULL, so a committed transaction survives a
// power cut. The store only ever adds index rows for objects whose pack is
// already sealed and fsynced, and adds a point row in the same transaction as
// the last of its objects (see store.h for the full write order).
//
// Thread-safety: every method is safe from any thread. Three connections keep
// slow work apart: one for writes (serialised), one for point lookups (the hot
// path of writers and readers), one for the GC's long scans, so a GC pass
// never stalls a writer's dedup lookups.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "store/digest.h"
#include "store/format.h"

namespace rpoint {
class SqliteDb;
}

namespace rpoint::store {

using PointId = uint64_t;

struct ObjectLoc {
  uint64_t pack = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

struct PackRow {
  uint64_t id = 0;
  uint64_t bytes = 0;  // file size
  uint64_t objects = 0;
  // When its objects entered the index (CLOCK_REALTIME); a pack indexed with
  // a point record gets the record's created_ns, a repacked one keeps the
  // original's. So every object a point names is in a pack whose created_ns
  // is <= the point's (the GC relies on it for unreadable pages).
  int64_t created_ns = 0;
};

// One disk restore point as recorded; see PointInfo in store.h.
struct PointRecord {
  PointId id = 0;
  Digest root;
  uint64_t size = 0;
  uint32_t chunk_size = 0;
  uint32_t fanout = kFanout;
  uint32_t depth = 1;
  PointId parent = 0;  // 0: none
  int64_t created_ns = 0;
  std::string tag;
  uint64_t new_chunks = 0;
  uint64_t new_chunk_bytes = 0;
  uint64_t new_pages = 0;
  uint64_t put_slots = 0;
};

// The objects a sealed pack adds to the index.
struct SealedPack {
  uint64_t id = 0;
  uint64_t bytes = 0;
  std::vector<PackEntry> entries;
};

class Catalog {
 public:
  static Result<std::unique_ptr<Catalog>> Open(const std::string& path);
  ~Catalog();
  Catalog(const Catalog&) = delete;
  Catalog& operator=(const Catalog&) = delete;

  // --- chunk index -----------------------------------------------------------
  Result<std::optional<ObjectLoc>> lookup(const Digest& d);
  // The same for n digests in one go (one lock, one cached statement): what a
  // writer's batch of chunks or a reader's leaf of slots asks, without a
  // round trip per chunk. out[i] answers d[i].
  Result<std::vector<std::optional<ObjectLoc>>> lookup_many(const Digest* d, size_t n);
  // Adds a sealed pack and its objects (an object already indexed elsewhere
  // keeps its first location; a pack already listed is not an error, so a
  // rebuild and a writer may both add it), and, when `point` is given, the
  // point record in the same transaction: with point->id when set (the id its
  // point file names), else a new one. Returns the point id (0 without one).
  Result<PointId> add_pack(const SealedPack& pack, const PointRecord* point);
  // GC: streams every index row (on the scan connection; consistent snapshot).
  Status for_each_object(const std::function<void(const Digest&, const ObjectLoc&)>& fn);
  // GC: removes index rows; returns how many existed.
  Result<uint64_t> delete_objects(const std::vector<Digest>& digests);
  Result<std::vector<PackEntry>> objects_in_pack(uint64_t pack);
  // GC repack: moves the listed objects from old_pack into new_pack (sealed),
  // and drops old_pack's row, in one transaction.
  Status replace_pack(uint64_t old_pack, const SealedPack& new_pack);
  // Drops a pack row, only if no object row points into it any more.
  Result<bool> delete_pack_if_empty(uint64_t pack);
  Result<std::vector<PackRow>> packs();
  Result<uint64_t> object_count();

  // --- points ----------------------------------------------------------------
  Result<std::optional<PointRecord>> get_point(PointId id);
  Result<std::vector<PointRecord>> list_points();
  Result<bool> delete_point(PointId id);
  // The highest point id ever handed out (deleted ones included), 0 if none.
  Result<PointId> max_point_id();

  // --- verification results -------------------------------------------------
  // Moves damaged objects out of the index into bad_objects, so the next
  // writer that puts the same content stores a fresh copy (which heals every
  // point naming that digest).
  // A row is moved only while the index still names that location.
  Status quarantine(const std::vector<std::pair<Digest, ObjectLoc>>& bad, const std::string& why);
  // The same for every object the index places in pack `pack` (its file is
  // gone or shorter than recorded), and the pack's row goes: a file put back
  // is indexed again as an unknown pack. Returns how many objects were moved.
  Result<uint64_t> quarantine_pack(uint64_t pack, const std::string& why);
  // Digests quarantined and not stored again since (usually none).
  Result<std::vector<Digest>> unhealed_bad_objects();

 private:
  Catalog() = default;
  std::unique_ptr<SqliteDb> wr_;
  std::unique_ptr<SqliteDb> rd_;
  std::unique_ptr<SqliteDb> scan_;
  std::mutex wr_mu_;
  std::mutex rd_mu_;
  std::mutex scan_mu_;
};

}  // namespace rpoint::store
