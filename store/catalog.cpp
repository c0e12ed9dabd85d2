#include "store/catalog.h"

#include <sqlite3.h>
#include <time.h>

#include <map>

#include "common/thread_role.h"
#include "common/fault_sqlite_vfs.h"
#include "store/macros.h"

namespace rpoint::store {
namespace {

constexpr int kFormatVersion = 1;

const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs(
  id INTEGER PRIMARY KEY, bytes INTEGER NOT NULL, objects INTEGER NOT NULL,
  created_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects(
  digest BLOB PRIMARY KEY, pack INTEGER NOT NULL, offset INTEGER NOT NULL,
  length INTEGER NOT NULL, kind INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_pack ON objects(pack);
CREATE TABLE IF NOT EXISTS points(
  id INTEGER PRIMARY KEY AUTOINCREMENT, root BLOB NOT NULL, size INTEGER NOT NULL,
  chunk_size INTEGER NOT NULL, fanout INTEGER NOT NULL, depth INTEGER NOT NULL,
  parent INTEGER NOT NULL, created_ns INTEGER NOT NULL, tag TEXT NOT NULL,
  new_chunks INTEGER NOT NULL, new_chunk_bytes INTEGER NOT NULL,
  new_pages INTEGER NOT NULL, put_slots INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bad_objects(
  digest BLOB NOT NULL, pack INTEGER NOT NULL, offset INTEGER NOT NULL,
  length INTEGER NOT NULL, detected_ns INTEGER NOT NULL, reason TEXT NOT NULL);
)sql";

const char* kPointCols =
    "id, root, size, chunk_size, fanout, depth, parent, created_ns, tag, new_chunks, "
    "new_chunk_bytes, new_pages, put_slots";

int64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace

// One sqlite3 connection and its prepared statements (prepared once, reset
// after each use). Not thread-safe: the Catalog guards each with a mutex.
class Catalog::Conn {
 public:
  class Stmt {
   public:
    Stmt(Conn* c, sqlite3_stmt* s) : c_(c), s_(s) {}
    Stmt(const Stmt&) = delete;
    Stmt& operator=(const Stmt&) = delete;
    ~Stmt() { reset(); }
    // Ready for the next row of a loop (same statement, new bindings).
    void reset() {
      sqlite3_reset(s_);
      sqlite3_clear_bindings(s_);
      bind_rc_ = SQLITE_OK;
    }
    Stmt& bind(int i, int64_t v) {
      note(sqlite3_bind_int64(s_, i, v));
      return *this;
    }
    Stmt& bind(int i, const Digest& d) {
      note(sqlite3_bind_blob(s_, i, d.b.data(), Digest::kSize, SQLITE_TRANSIENT));
      return *this;
    }
    Stmt& bind(int i, const std::string& v) {
      note(sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
      return *this;
    }
    // true: a row is available.
    Result<bool> step() {
      if (bind_rc_ != SQLITE_OK) return c_->error(bind_rc_, "bind");
      int rc = sqlite3_step(s_);
      if (rc == SQLITE_ROW) return true;
      if (rc == SQLITE_DONE) return false;
      return c_->error(rc, "step");
    }
    Status run() {
      auto r = step();
      return r.ok() ? Status::Ok() : r.status();
    }
    int64_t i64(int col) const { return sqlite3_column_int64(s_, col); }
    std::string text(int col) const {
      const unsigned char* t = sqlite3_column_text(s_, col);
      return t ? std::string(reinterpret_cast<const char*>(t),
                             static_cast<size_t>(sqlite3_column_bytes(s_, col)))
               : std::string();
    }
    Digest digest(int col) const {
      Digest d;
      const void* p = sqlite3_column_blob(s_, col);
      if (p != nullptr && sqlite3_column_bytes(s_, col) == int(Digest::kSize)) {
        std::memcpy(d.b.data(), p, Digest::kSize);
      }
      return d;
    }

   private:
    void note(int rc) {
      if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) bind_rc_ = rc;
    }
    Conn* c_;
    sqlite3_stmt* s_;
    int bind_rc_ = SQLITE_OK;
  };

  static Result<std::unique_ptr<Conn>> Open(const std::string& path, bool write) {
    std::unique_ptr<Conn> c(new Conn());
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (write ? SQLITE_OPEN_CREATE : 0);
    int rc = sqlite3_open_v2(path.c_str(), &c->db_, flags, fault::SqliteVfs("catalog"));
    if (rc != SQLITE_OK) {
      return Status::IoError("sqlite open " + path + ": " +
                             (c->db_ ? sqlite3_errmsg(c->db_) : sqlite3_errstr(rc)));
    }
    sqlite3_busy_timeout(c->db_, 30000);
    Status s =
        c->exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-32768;");
    if (!s.ok()) return s;
    return c;
  }
  ~Conn() {
    for (auto& [sql, st] : stmts_) sqlite3_finalize(st);
    if (db_) sqlite3_close(db_);
  }

  Status exec(const char* sql) {
    RPOINT_ASSERT_MAY_BLOCK("SQLite");
    char* err = nullptr;
    int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &err);
    sqlite3_free(err);  // the same text as sqlite3_errmsg, which error() reports
    if (rc != SQLITE_OK) return error(rc, "'" + std::string(sql).substr(0, 80) + "'");
    return Status::Ok();
  }

  // Every statement starts here: SQLite may read, lock and fsync.
  Result<std::unique_ptr<Stmt>> prepare(const std::string& sql) {
    RPOINT_ASSERT_MAY_BLOCK("SQLite");
    auto it = stmts_.find(sql);
    if (it == stmts_.end()) {
      sqlite3_stmt* st = nullptr;
      int rc = sqlite3_prepare_v3(db_, sql.c_str(), -1, SQLITE_PREPARE_PERSISTENT, &st, nullptr);
      if (rc != SQLITE_OK) return error(rc, "prepare '" + sql + "'");
      it = stmts_.emplace(sql, st).first;
    }
    return std::make_unique<Stmt>(this, it->second);
  }

  Status error(int rc, const std::string& what) {
    // Named by file: a failing commit must say which database failed.
    std::string m = "sqlite " + what + ": " + sqlite3_errmsg(db_) + " (" +
                    sqlite3_db_filename(db_, "main") + ")";
    rc &= 0xff;
    if (rc == SQLITE_FULL) return Status::NoSpace(m);
    if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED) return Status::Conflict(m);
    return Status::IoError(m);
  }

  // BEGIN IMMEDIATE ... COMMIT; rolled back unless commit() succeeded.
  class Txn {
   public:
    explicit Txn(Conn* c) : c_(c) {}
    ~Txn() {
      if (active_) (void)c_->exec("ROLLBACK");
    }
    Status begin() {
      Status s = c_->exec("BEGIN IMMEDIATE");
      active_ = s.ok();
      return s;
    }
    Status commit() {
      Status s = c_->exec("COMMIT");
      if (s.ok()) active_ = false;
      return s;
    }

   private:
    Conn* c_;
    bool active_ = false;
  };

  sqlite3* db() { return db_; }

 private:
  Conn() = default;
  sqlite3* db_ = nullptr;
  std::map<std::string, sqlite3_stmt*> stmts_;
};

Catalog::~Catalog() = default;

Result<std::unique_ptr<Catalog>> Catalog::Open(const std::string& path) {
  std::unique_ptr<Catalog> c(new Catalog());
  auto wr = Conn::Open(path, true);
  if (!wr.ok()) return wr.status();
  c->wr_ = std::move(wr).value();
  STORE_RETURN_IF_ERROR(c->wr_->exec(kSchema));
  {
    STORE_ASSIGN_OR_RETURN(auto st,
                           c->wr_->prepare("SELECT value FROM meta WHERE key='format_version'"));
    STORE_ASSIGN_OR_RETURN(auto row, st->step());
    if (row) {
      std::string v = st->text(0);
      if (v != std::to_string(kFormatVersion)) {
        return Status::Unsupported("store.db has format version " + v + ", this build reads " +
                                   std::to_string(kFormatVersion));
      }
    } else {
      STORE_ASSIGN_OR_RETURN(
          auto ins, c->wr_->prepare("INSERT INTO meta(key, value) VALUES('format_version', ?)"));
      ins->bind(1, std::to_string(kFormatVersion));
      STORE_RETURN_IF_ERROR(ins->run());
    }
  }
  auto rd = Conn::Open(path, false);
  if (!rd.ok()) return rd.status();
  c->rd_ = std::move(rd).value();
  auto scan = Conn::Open(path, false);
  if (!scan.ok()) return scan.status();
  c->scan_ = std::move(scan).value();
  return c;
}

Result<std::optional<ObjectLoc>> Catalog::lookup(const Digest& d) {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(auto st,
                         rd_->prepare("SELECT pack, offset, length FROM objects WHERE digest=?"));
  st->bind(1, d);
  STORE_ASSIGN_OR_RETURN(auto row, st->step());
  if (!row) return std::optional<ObjectLoc>();
  return std::optional<ObjectLoc>(
      ObjectLoc{uint64_t(st->i64(0)), uint64_t(st->i64(1)), uint32_t(st->i64(2))});
}

Result<PointId> Catalog::add_pack(const SealedPack& pack, const PointRecord* point) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  Conn::Txn txn(wr_.get());
  STORE_RETURN_IF_ERROR(txn.begin());
  if (pack.id != 0) {
    STORE_ASSIGN_OR_RETURN(
        auto ip, wr_->prepare("INSERT OR IGNORE INTO packs(id, bytes, objects, created_ns) "
                              "VALUES(?,?,?,?)"));
    ip->bind(1, int64_t(pack.id))
        .bind(2, int64_t(pack.bytes))
        .bind(3, int64_t(pack.entries.size()))
        .bind(4, point != nullptr ? point->created_ns : NowNs());  // see PackRow::created_ns
    STORE_RETURN_IF_ERROR(ip->run());
    STORE_ASSIGN_OR_RETURN(auto io,
                           wr_->prepare("INSERT OR IGNORE INTO objects(digest, pack, offset, "
                                        "length, kind) VALUES(?,?,?,?,?)"));
    for (const PackEntry& e : pack.entries) {
      Conn::Stmt& s = *io;
      s.bind(1, e.digest)
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
        auto pt, wr_->prepare("INSERT INTO points(root, size, chunk_size, fanout, depth, parent, "
                              "created_ns, tag, new_chunks, new_chunk_bytes, new_pages, put_slots, "
                              "id) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)"));
    pt->bind(1, point->root)
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
    if (point->id != 0) pt->bind(13, int64_t(point->id));  // unbound: NULL, a new id
    STORE_RETURN_IF_ERROR(pt->run());
    id = PointId(sqlite3_last_insert_rowid(wr_->db()));
  }
  STORE_RETURN_IF_ERROR(txn.commit());
  return id;
}

Status Catalog::for_each_object(const std::function<void(const Digest&, const ObjectLoc&)>& fn) {
  std::lock_guard<std::mutex> lock(scan_mu_);
  STORE_ASSIGN_OR_RETURN(auto st,
                         scan_->prepare("SELECT digest, pack, offset, length FROM objects"));
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st->step());
    if (!row) break;
    fn(st->digest(0), ObjectLoc{uint64_t(st->i64(1)), uint64_t(st->i64(2)), uint32_t(st->i64(3))});
  }
  return Status::Ok();
}

Result<uint64_t> Catalog::delete_objects(const std::vector<Digest>& digests) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  Conn::Txn txn(wr_.get());
  STORE_RETURN_IF_ERROR(txn.begin());
  STORE_ASSIGN_OR_RETURN(auto st, wr_->prepare("DELETE FROM objects WHERE digest=?"));
  uint64_t n = 0;
  for (const Digest& d : digests) {
    st->bind(1, d);
    STORE_RETURN_IF_ERROR(st->run());
    n += uint64_t(sqlite3_changes(wr_->db()));
    st->reset();
  }
  STORE_RETURN_IF_ERROR(txn.commit());
  return n;
}

Result<std::vector<PackEntry>> Catalog::objects_in_pack(uint64_t pack) {
  std::lock_guard<std::mutex> lock(scan_mu_);
  STORE_ASSIGN_OR_RETURN(auto st, scan_->prepare("SELECT digest, offset, length, kind FROM objects "
                                                 "WHERE pack=? ORDER BY offset"));
  st->bind(1, int64_t(pack));
  std::vector<PackEntry> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st->step());
    if (!row) break;
    PackEntry e{};
    e.digest = st->digest(0);
    e.offset = uint64_t(st->i64(1));
    e.length = uint32_t(st->i64(2));
    e.kind = uint8_t(st->i64(3));
    out.push_back(e);
  }
  return out;
}

Status Catalog::replace_pack(uint64_t old_pack, const SealedPack& np) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  Conn::Txn txn(wr_.get());
  STORE_RETURN_IF_ERROR(txn.begin());
  // The copy keeps the original's created_ns (see PackRow::created_ns).
  STORE_ASSIGN_OR_RETURN(auto ip, wr_->prepare("INSERT INTO packs(id, bytes, objects, created_ns) "
                                               "SELECT ?, ?, ?, created_ns FROM packs WHERE id=?"));
  ip->bind(1, int64_t(np.id))
      .bind(2, int64_t(np.bytes))
      .bind(3, int64_t(np.entries.size()))
      .bind(4, int64_t(old_pack));
  STORE_RETURN_IF_ERROR(ip->run());
  if (sqlite3_changes(wr_->db()) != 1) {
    return Status::Internal("repack: pack " + std::to_string(old_pack) + " has no row");
  }
  STORE_ASSIGN_OR_RETURN(
      auto up, wr_->prepare("UPDATE objects SET pack=?, offset=? WHERE digest=? AND pack=?"));
  for (const PackEntry& e : np.entries) {
    up->bind(1, int64_t(np.id))
        .bind(2, int64_t(e.offset))
        .bind(3, e.digest)
        .bind(4, int64_t(old_pack));
    STORE_RETURN_IF_ERROR(up->run());
    up->reset();
  }
  STORE_ASSIGN_OR_RETURN(auto left, wr_->prepare("SELECT COUNT(*) FROM objects WHERE pack=?"));
  left->bind(1, int64_t(old_pack));
  STORE_ASSIGN_OR_RETURN(auto row, left->step());
  if (row && left->i64(0) != 0) {
    // Only the GC moves or removes rows, and it holds the pack still; a row
    // left behind means the copy missed an object: keep the old pack.
    return Status::Internal("repack of pack " + std::to_string(old_pack) + " left " +
                            std::to_string(left->i64(0)) + " objects behind");
  }
  STORE_ASSIGN_OR_RETURN(auto dp, wr_->prepare("DELETE FROM packs WHERE id=?"));
  dp->bind(1, int64_t(old_pack));
  STORE_RETURN_IF_ERROR(dp->run());
  return txn.commit();
}

Result<bool> Catalog::delete_pack_if_empty(uint64_t pack) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  Conn::Txn txn(wr_.get());
  STORE_RETURN_IF_ERROR(txn.begin());
  STORE_ASSIGN_OR_RETURN(auto q, wr_->prepare("SELECT 1 FROM objects WHERE pack=? LIMIT 1"));
  q->bind(1, int64_t(pack));
  STORE_ASSIGN_OR_RETURN(auto used, q->step());
  if (used) return false;
  STORE_ASSIGN_OR_RETURN(auto dp, wr_->prepare("DELETE FROM packs WHERE id=?"));
  dp->bind(1, int64_t(pack));
  STORE_RETURN_IF_ERROR(dp->run());
  bool existed = sqlite3_changes(wr_->db()) > 0;
  STORE_RETURN_IF_ERROR(txn.commit());
  return existed;
}

Result<std::vector<PackRow>> Catalog::packs() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(
      auto st, rd_->prepare("SELECT id, bytes, objects, created_ns FROM packs ORDER BY id"));
  std::vector<PackRow> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st->step());
    if (!row) break;
    out.push_back(
        PackRow{uint64_t(st->i64(0)), uint64_t(st->i64(1)), uint64_t(st->i64(2)), st->i64(3)});
  }
  return out;
}

Result<uint64_t> Catalog::object_count() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(auto st, rd_->prepare("SELECT COUNT(*) FROM objects"));
  STORE_ASSIGN_OR_RETURN(auto row, st->step());
  return row ? uint64_t(st->i64(0)) : 0;
}

namespace {
template <typename S>
PointRecord ReadPoint(const S& st) {
  PointRecord p;
  p.id = PointId(st.i64(0));
  p.root = st.digest(1);
  p.size = uint64_t(st.i64(2));
  p.chunk_size = uint32_t(st.i64(3));
  p.fanout = uint32_t(st.i64(4));
  p.depth = uint32_t(st.i64(5));
  p.parent = PointId(st.i64(6));
  p.created_ns = st.i64(7);
  p.tag = st.text(8);
  p.new_chunks = uint64_t(st.i64(9));
  p.new_chunk_bytes = uint64_t(st.i64(10));
  p.new_pages = uint64_t(st.i64(11));
  p.put_slots = uint64_t(st.i64(12));
  return p;
}
}  // namespace

Result<std::optional<PointRecord>> Catalog::get_point(PointId id) {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(
      auto st, rd_->prepare(std::string("SELECT ") + kPointCols + " FROM points WHERE id=?"));
  st->bind(1, int64_t(id));
  STORE_ASSIGN_OR_RETURN(auto row, st->step());
  if (!row) return std::optional<PointRecord>();
  return std::optional<PointRecord>(ReadPoint(*st));
}

Result<std::vector<PointRecord>> Catalog::list_points() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(
      auto st, rd_->prepare(std::string("SELECT ") + kPointCols + " FROM points ORDER BY id"));
  std::vector<PointRecord> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(auto row, st->step());
    if (!row) break;
    out.push_back(ReadPoint(*st));
  }
  return out;
}

Result<bool> Catalog::delete_point(PointId id) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  STORE_ASSIGN_OR_RETURN(auto st, wr_->prepare("DELETE FROM points WHERE id=?"));
  st->bind(1, int64_t(id));
  STORE_RETURN_IF_ERROR(st->run());
  return sqlite3_changes(wr_->db()) > 0;
}

Result<PointId> Catalog::max_point_id() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(
      auto st, rd_->prepare("SELECT MAX(COALESCE((SELECT MAX(id) FROM points), 0), "
                            "COALESCE((SELECT seq FROM sqlite_sequence WHERE name='points'), 0))"));
  STORE_ASSIGN_OR_RETURN(auto row, st->step());
  return row ? PointId(st->i64(0)) : 0;
}

Status Catalog::quarantine(const std::vector<std::pair<Digest, ObjectLoc>>& bad,
                           const std::string& why) {
  std::lock_guard<std::mutex> lock(wr_mu_);
  Conn::Txn txn(wr_.get());
  STORE_RETURN_IF_ERROR(txn.begin());
  STORE_ASSIGN_OR_RETURN(auto ins,
                         wr_->prepare("INSERT INTO bad_objects(digest, pack, offset, length, "
                                      "detected_ns, reason) VALUES(?,?,?,?,?,?)"));
  STORE_ASSIGN_OR_RETURN(auto del, wr_->prepare("DELETE FROM objects WHERE digest=? AND pack=? AND "
                                                "offset=?"));
  for (const auto& [d, loc] : bad) {
    del->bind(1, d).bind(2, int64_t(loc.pack)).bind(3, int64_t(loc.offset));
    STORE_RETURN_IF_ERROR(del->run());
    del->reset();
    // Only the copy the caller read is damaged: when the index names another
    // location by now (a fresh copy, a repack), there is nothing to record.
    if (sqlite3_changes(wr_->db()) == 0) continue;
    ins->bind(1, d)
        .bind(2, int64_t(loc.pack))
        .bind(3, int64_t(loc.offset))
        .bind(4, int64_t(loc.length))
        .bind(5, NowNs())
        .bind(6, why);
    STORE_RETURN_IF_ERROR(ins->run());
    ins->reset();
  }
  return txn.commit();
}

Result<std::vector<Digest>> Catalog::unhealed_bad_objects() {
  std::lock_guard<std::mutex> lock(rd_mu_);
  STORE_ASSIGN_OR_RETURN(auto q, rd_->prepare("SELECT DISTINCT digest FROM bad_objects WHERE "
                                              "digest NOT IN (SELECT digest FROM objects)"));
  std::vector<Digest> out;
  for (;;) {
    STORE_ASSIGN_OR_RETURN(bool row, q->step());
    if (!row) break;
    out.push_back(q->digest(0));
  }
  return out;
}

}  // namespace rpoint::store
