#include "store/catalog.h"

#include <time.h>

#include <cstring>

#include "db/migrations.h"
#include "db/sqlite.h"
#include "store/macros.h"

namespace rpoint::store {
namespace {

using rpoint::SqliteDb;
using rpoint::SqliteOptions;
using rpoint::SqliteStmt;
using rpoint::SqliteTxn;

constexpr int kFormatVersion = 1;

const char* kPointCols =
    "id, root, size, chunk_size, fanout, depth, parent, created_ns, tag, new_chunks, "
    "new_chunk_bytes, new_pages, put_slots";

int64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

SqliteStmt& BindDigest(SqliteStmt& st, int i, const Digest& d) {
  return st.bind_blob(i, d.b.data(), Digest::kSize);
}

Digest ColumnDigest(const SqliteStmt& st, int col) {
  Digest d;
  const void* p = st.column_blob(col);
  if (p != nullptr && st.column_bytes(col) == Digest::kSize)
    std::memcpy(d.b.data(), p, Digest::kSize);
  return d;
}

// One connection of the three (see catalog.h). Statements come from its
// cache (db/sqlite.h: prepared once, reset after each use).
Result<std::unique_ptr<SqliteDb>> OpenConn(const std::string& path, bool write) {
  SqliteOptions o;
  o.fault_kind = "catalog";  // fault points catalog.write / catalog.sync
  o.create = write;
  o.busy_timeout_ms = 30000;
  STORE_ASSIGN_OR_RETURN(auto c, SqliteDb::Open(path, o));
  STORE_RETURN_IF_ERROR(
      c->exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-32768;"));
  return c;
}

}  // namespace

Catalog::~Catalog() = default;

Result<std::unique_ptr<Catalog>> Catalog::Open(const std::string& path) {
  std::unique_ptr<Catalog> c(new Catalog());
  STORE_ASSIGN_OR_RETURN(c->wr_, OpenConn(path, true));
  STORE_RETURN_IF_ERROR(db::Migrate(*c->wr_, db::StoreSchema()));
  {
    STORE_ASSIGN_OR_RETURN(auto st,
                           c->wr_->prepare("SELECT value FROM meta WHERE key='format_version'"));
    STORE_ASSIGN_OR_RETURN(auto row, st.step());
    if (row) {
      std::string v = st.column_text(0);
      if (v != std::to_string(kFormatVersion)) {
        return Status::Unsupported("store.db has format version " + v + ", this build reads " +
                                   std::to_string(kFormatVersion));
      }
    } else {
      STORE_ASSIGN_OR_RETURN(
          auto ins, c->wr_->prepare("INSERT INTO meta(key, value) VALUES('format_version', ?)"));
      ins.bind(1, std::to_string(kFormatVersion));
      STORE_RETURN_IF_ERROR(ins.run());
    }
  }
  STORE_ASSIGN_OR_RETURN(c->rd_, OpenConn(path, false));
  STORE_ASSIGN_OR_RETURN(c->scan_, OpenConn(path, false));
  return c;
}

Result<std::optional<ObjectLoc>> Catalog::lookup(const Digest& d) {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(
      auto st, rd_->prepare_cached("SELECT pack, offset, length FROM objects WHERE digest=?"));
  BindDigest(st, 1, d);
  STORE_ASSIGN_OR_RETURN(auto row, st.step());
  if (!row) return std::optional<ObjectLoc>();
  return std::optional<ObjectLoc>(ObjectLoc{uint64_t(st.column_int(0)), uint64_t(st.column_int(1)),
                                            uint32_t(st.column_int(2))});
}

Result<std::vector<std::optional<ObjectLoc>>> Catalog::lookup_many(const Digest* d, size_t n) {
  std::vector<std::optional<ObjectLoc>> out(n);
  if (n == 0) return out;
  std::lock_guard<std::mutex> lock(rd_mu_);
  // One read transaction for the batch, not one per statement.
  STORE_RETURN_IF_ERROR(rd_->exec("BEGIN"));
  struct End {
    SqliteDb& db;
    ~End() { (void)db.exec("COMMIT"); }
  } end{*rd_};
  STORE_ASSIGN_OR_RETURN(
      auto st, rd_->prepare_cached("SELECT pack, offset, length FROM objects WHERE digest=?"));
  for (size_t i = 0; i < n; ++i) {
    if (i > 0) st.reset();
    BindDigest(st, 1, d[i]);
    STORE_ASSIGN_OR_RETURN(auto row, st.step());
    if (row) {
      out[i] = ObjectLoc{uint64_t(st.column_int(0)), uint64_t(st.column_int(1)),
                         uint32_t(st.column_int(2))};
    }
  }
  return out;
}

Result<PointId> Catalog::add_pack(const SealedPack& pack, const PointRecord* point) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto txn, SqliteTxn::Begin(*wr_));
  if (pack.id != 0) {
    STORE_ASSIGN_OR_RETURN(
        auto ip, wr_->prepare_cached("INSERT OR IGNORE INTO packs(id, bytes, objects, created_ns) "
                                     "VALUES(?,?,?,?)"));
    ip.bind(1, int64_t(pack.id))
        .bind(2, int64_t(pack.bytes))
        .bind(3, int64_t(pack.entries.size()))
        .bind(4, point != nullptr ? point->created_ns : NowNs());  // see PackRow::created_ns
    STORE_RETURN_IF_ERROR(ip.run());
    STORE_ASSIGN_OR_RETURN(
        auto io, wr_->prepare_cached("INSERT OR IGNORE INTO objects(digest, pack, offset, "
                                     "length, kind) VALUES(?,?,?,?,?)"));
    for (const PackEntry& e : pack.entries) {
      SqliteStmt& s = io;
      BindDigest(s, 1, e.digest)
          .bind(2, int64_t(pack.id))
          .bind(3, int64_t(e.offset))
          .bind(4, int64_t(e.length))
          .bind(5, int64_t(e.kind));
      STORE_RETURN_IF_ERROR(s.run());
      s.reset();
    }
  }
  PointId id = 0;
  if (point != nullptr) {
    STORE_ASSIGN_OR_RETURN(
        auto pt,
        wr_->prepare_cached("INSERT INTO points(root, size, chunk_size, fanout, depth, parent, "
                            "created_ns, tag, new_chunks, new_chunk_bytes, new_pages, put_slots, "
                            "id) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)"));
    BindDigest(pt, 1, point->root)
        .bind(2, int64_t(point->size))
        .bind(3, int64_t(point->chunk_size))
        .bind(4, int64_t(point->fanout))
        .bind(5, int64_t(point->depth))
        .bind(6, int64_t(point->parent))
        .bind(7, point->created_ns)
        .bind(8, point->tag)
        .bind(9, int64_t(point->new_chunks))
        .bind(10, int64_t(point->new_chunk_bytes))
        .bind(11, int64_t(point->new_pages))
        .bind(12, int64_t(point->put_slots));
    if (point->id != 0) pt.bind(13, int64_t(point->id));  // unbound: NULL, a new id
    STORE_RETURN_IF_ERROR(pt.run());
    id = PointId(wr_->last_insert_rowid());
  }
  STORE_RETURN_IF_ERROR(txn.commit());
  return id;
}

Status Catalog::for_each_object(const std::function<void(const Digest&, const ObjectLoc&)>& fn) {
  std::lock_guard<std::mutex> lock(scan_mu_);
  STORE_ASSIGN_OR_RETURN(auto st,
                         scan_->prepare_cached("SELECT digest, pack, offset, length FROM objects"));
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st.step());
    if (!row) break;
    fn(ColumnDigest(st, 0), ObjectLoc{uint64_t(st.column_int(1)), uint64_t(st.column_int(2)),
                                      uint32_t(st.column_int(3))});
  }
  return Status::Ok();
}

Result<uint64_t> Catalog::delete_objects(const std::vector<Digest>& digests) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto txn, SqliteTxn::Begin(*wr_));
  STORE_ASSIGN_OR_RETURN(auto st, wr_->prepare_cached("DELETE FROM objects WHERE digest=?"));
  uint64_t n = 0;
  for (const Digest& d : digests) {
    BindDigest(st, 1, d);
    STORE_RETURN_IF_ERROR(st.run());
    n += uint64_t(wr_->changes());
    st.reset();
  }
  STORE_RETURN_IF_ERROR(txn.commit());
  return n;
}

Result<std::vector<PackEntry>> Catalog::objects_in_pack(uint64_t pack) {
  std::lock_guard<std::mutex> lock(scan_mu_);
  STORE_ASSIGN_OR_RETURN(auto st,
                         scan_->prepare_cached("SELECT digest, offset, length, kind FROM objects "
                                               "WHERE pack=? ORDER BY offset"));
  st.bind(1, int64_t(pack));
  std::vector<PackEntry> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st.step());
    if (!row) break;
    PackEntry e{};
    e.digest = ColumnDigest(st, 0);
    e.offset = uint64_t(st.column_int(1));
    e.length = uint32_t(st.column_int(2));
    e.kind = uint8_t(st.column_int(3));
    out.push_back(e);
  }
  return out;
}

Status Catalog::replace_pack(uint64_t old_pack, const SealedPack& np) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto txn, SqliteTxn::Begin(*wr_));
  // The copy keeps the original's created_ns (see PackRow::created_ns).
  STORE_ASSIGN_OR_RETURN(auto ip,
                         wr_->prepare_cached("INSERT INTO packs(id, bytes, objects, created_ns) "
                                             "SELECT ?, ?, ?, created_ns FROM packs WHERE id=?"));
  ip.bind(1, int64_t(np.id))
      .bind(2, int64_t(np.bytes))
      .bind(3, int64_t(np.entries.size()))
      .bind(4, int64_t(old_pack));
  STORE_RETURN_IF_ERROR(ip.run());
  if (wr_->changes() != 1) {
    return Status::Internal("repack: pack " + std::to_string(old_pack) + " has no row");
  }
  STORE_ASSIGN_OR_RETURN(
      auto up,
      wr_->prepare_cached("UPDATE objects SET pack=?, offset=? WHERE digest=? AND pack=?"));
  for (const PackEntry& e : np.entries) {
    BindDigest(up, 3, e.digest)
        .bind(1, int64_t(np.id))
        .bind(2, int64_t(e.offset))
        .bind(4, int64_t(old_pack));
    STORE_RETURN_IF_ERROR(up.run());
    up.reset();
  }
  STORE_ASSIGN_OR_RETURN(auto left,
                         wr_->prepare_cached("SELECT COUNT(*) FROM objects WHERE pack=?"));
  left.bind(1, int64_t(old_pack));
  STORE_ASSIGN_OR_RETURN(auto row, left.step());
  if (row && left.column_int(0) != 0) {
    // Only the GC moves or removes rows, and it holds the pack still; a row
    // left behind means the copy missed an object: keep the old pack.
    return Status::Internal("repack of pack " + std::to_string(old_pack) + " left " +
                            std::to_string(left.column_int(0)) + " objects behind");
  }
  STORE_ASSIGN_OR_RETURN(auto dp, wr_->prepare_cached("DELETE FROM packs WHERE id=?"));
  dp.bind(1, int64_t(old_pack));
  STORE_RETURN_IF_ERROR(dp.run());
  return txn.commit();
}

Result<bool> Catalog::delete_pack_if_empty(uint64_t pack) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto txn, SqliteTxn::Begin(*wr_));
  STORE_ASSIGN_OR_RETURN(auto q, wr_->prepare_cached("SELECT 1 FROM objects WHERE pack=? LIMIT 1"));
  q.bind(1, int64_t(pack));
  STORE_ASSIGN_OR_RETURN(auto used, q.step());
  if (used) return false;
  STORE_ASSIGN_OR_RETURN(auto dp, wr_->prepare_cached("DELETE FROM packs WHERE id=?"));
  dp.bind(1, int64_t(pack));
  STORE_RETURN_IF_ERROR(dp.run());
  bool existed = wr_->changes() > 0;
  STORE_RETURN_IF_ERROR(txn.commit());
  return existed;
}

Result<std::vector<PackRow>> Catalog::packs() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(
      auto st, rd_->prepare_cached("SELECT id, bytes, objects, created_ns FROM packs ORDER BY id"));
  std::vector<PackRow> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st.step());
    if (!row) break;
    out.push_back(PackRow{uint64_t(st.column_int(0)), uint64_t(st.column_int(1)),
                          uint64_t(st.column_int(2)), st.column_int(3)});
  }
  return out;
}

Result<uint64_t> Catalog::object_count() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(auto st, rd_->prepare_cached("SELECT COUNT(*) FROM objects"));
  STORE_ASSIGN_OR_RETURN(auto row, st.step());
  return row ? uint64_t(st.column_int(0)) : 0;
}

namespace {
PointRecord ReadPoint(const SqliteStmt& st) {
  PointRecord p;
  p.id = PointId(st.column_int(0));
  p.root = ColumnDigest(st, 1);
  p.size = uint64_t(st.column_int(2));
  p.chunk_size = uint32_t(st.column_int(3));
  p.fanout = uint32_t(st.column_int(4));
  p.depth = uint32_t(st.column_int(5));
  p.parent = PointId(st.column_int(6));
  p.created_ns = st.column_int(7);
  p.tag = st.column_text(8);
  p.new_chunks = uint64_t(st.column_int(9));
  p.new_chunk_bytes = uint64_t(st.column_int(10));
  p.new_pages = uint64_t(st.column_int(11));
  p.put_slots = uint64_t(st.column_int(12));
  return p;
}
}  // namespace

Result<std::optional<PointRecord>> Catalog::get_point(PointId id) {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(auto st, rd_->prepare_cached(std::string("SELECT ") + kPointCols +
                                                      " FROM points WHERE id=?"));
  st.bind(1, int64_t(id));
  STORE_ASSIGN_OR_RETURN(auto row, st.step());
  if (!row) return std::optional<PointRecord>();
  return std::optional<PointRecord>(ReadPoint(st));
}

Result<std::vector<PointRecord>> Catalog::list_points() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(auto st, rd_->prepare_cached(std::string("SELECT ") + kPointCols +
                                                      " FROM points ORDER BY id"));
  std::vector<PointRecord> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st.step());
    if (!row) break;
    out.push_back(ReadPoint(st));
  }
  return out;
}

Result<bool> Catalog::delete_point(PointId id) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto st, wr_->prepare_cached("DELETE FROM points WHERE id=?"));
  st.bind(1, int64_t(id));
  STORE_RETURN_IF_ERROR(st.run());
  return wr_->changes() > 0;
}

Result<PointId> Catalog::max_point_id() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(
      auto st,
      rd_->prepare_cached("SELECT MAX(COALESCE((SELECT MAX(id) FROM points), 0), "
                          "COALESCE((SELECT seq FROM sqlite_sequence WHERE name='points'), 0))"));
  STORE_ASSIGN_OR_RETURN(auto row, st.step());
  return row ? PointId(st.column_int(0)) : 0;
}

Status Catalog::quarantine(const std::vector<std::pair<Digest, ObjectLoc>>& bad,
                           const std::string& why) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto txn, SqliteTxn::Begin(*wr_));
  STORE_ASSIGN_OR_RETURN(
      auto ins, wr_->prepare_cached("INSERT INTO bad_objects(digest, pack, offset, length, "
                                    "detected_ns, reason) VALUES(?,?,?,?,?,?)"));
  STORE_ASSIGN_OR_RETURN(auto del,
                         wr_->prepare_cached("DELETE FROM objects WHERE digest=? AND pack=? AND "
                                             "offset=?"));
  for (const auto& [d, loc] : bad) {
    BindDigest(del, 1, d).bind(2, int64_t(loc.pack)).bind(3, int64_t(loc.offset));
    STORE_RETURN_IF_ERROR(del.run());
    del.reset();
    // Only the copy the caller read is damaged: when the index names another
    // location by now (a fresh copy, a repack), there is nothing to record.
    if (wr_->changes() == 0) continue;
    BindDigest(ins, 1, d)
        .bind(2, int64_t(loc.pack))
        .bind(3, int64_t(loc.offset))
        .bind(4, int64_t(loc.length))
        .bind(5, NowNs())
        .bind(6, why);
    STORE_RETURN_IF_ERROR(ins.run());
    ins.reset();
  }
  return txn.commit();
}

Result<uint64_t> Catalog::quarantine_pack(uint64_t pack, const std::string& why) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto txn, SqliteTxn::Begin(*wr_));
  STORE_ASSIGN_OR_RETURN(
      auto ins, wr_->prepare_cached("INSERT INTO bad_objects(digest, pack, offset, length, "
                                    "detected_ns, reason) SELECT digest, pack, offset, length, ?, "
                                    "? FROM objects WHERE pack=?"));
  ins.bind(1, NowNs()).bind(2, why).bind(3, int64_t(pack));
  STORE_RETURN_IF_ERROR(ins.run());
  const uint64_t moved = uint64_t(wr_->changes());
  STORE_ASSIGN_OR_RETURN(auto del, wr_->prepare_cached("DELETE FROM objects WHERE pack=?"));
  del.bind(1, int64_t(pack));
  STORE_RETURN_IF_ERROR(del.run());
  // Forgotten as a pack too: a file put back is a pack the index does not
  // know, indexed again by the next open or repair (its objects healed).
  STORE_ASSIGN_OR_RETURN(auto dp, wr_->prepare_cached("DELETE FROM packs WHERE id=?"));
  dp.bind(1, int64_t(pack));
  STORE_RETURN_IF_ERROR(dp.run());
  STORE_RETURN_IF_ERROR(txn.commit());
  return moved;
}

Result<std::vector<Digest>> Catalog::unhealed_bad_objects() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(auto q,
                         rd_->prepare_cached("SELECT DISTINCT digest FROM bad_objects WHERE "
                                             "digest NOT IN (SELECT digest FROM objects)"));
  std::vector<Digest> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(bool row, q.step());
    if (!row) break;
    out.push_back(ColumnDigest(q, 0));
  }
  return out;
}

}  // namespace rpoint::store
