#include "db/sqlite.h"

#include <sqlite3.h>

#include <utility>

#include "common/fault_sqlite_vfs.h"
#include "common/thread_role.h"

namespace rpoint {

namespace {

// SQLITE_FULL / IOERR / CANTOPEN mean the storage under the database failed,
// not that the caller asked for something wrong; CORRUPT / NOTADB that the
// file itself is damaged.
Code CodeFor(int rc) {
  switch (rc & 0xff) {
    case SQLITE_FULL:
      return Code::kNoSpace;
    case SQLITE_CONSTRAINT:
      return Code::kAlreadyExists;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return Code::kConflict;
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_AUTH:
      return Code::kPermissionDenied;
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
      return Code::kIoError;
    // The file is there and readable but is not a sound database: retrying
    // cannot help, the operator must act (disks/ and store/ say how).
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return Code::kCorruption;
    default:
      return Code::kInternal;
  }
}

}  // namespace

Result<std::unique_ptr<SqliteDb>> SqliteDb::Open(const std::string& path,
                                                 const SqliteOptions& options) {
  RPOINT_ASSERT_MAY_BLOCK("SQLite");
  sqlite3* raw = nullptr;
  int flags =
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (options.create ? SQLITE_OPEN_CREATE : 0);
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags, fault::SqliteVfs(options.fault_kind));
  if (rc != SQLITE_OK) {
    std::string msg = raw ? sqlite3_errmsg(raw) : sqlite3_errstr(rc);
    sqlite3_close(raw);  // a handle is returned even on failure; NULL is a no-op
    return Status(CodeFor(rc),
                  "open " + std::string(options.fault_kind) + " database " + path + ": " + msg);
  }
  sqlite3_extended_result_codes(raw, 1);
  // Another connection or process (an admin's sqlite3 shell) holding a lock
  // briefly must not fail requests.
  sqlite3_busy_timeout(raw, options.busy_timeout_ms);
  return std::unique_ptr<SqliteDb>(new SqliteDb(raw, path));
}

SqliteDb::~SqliteDb() {
  for (auto& [sql, st] : cache_) sqlite3_finalize(st);
  sqlite3_close_v2(db_);
}

int SqliteDb::changes() const {
  return sqlite3_changes(db_);
}

int64_t SqliteDb::last_insert_rowid() const {
  return sqlite3_last_insert_rowid(db_);
}

Status SqliteDb::error(int rc, const std::string& context) const {
  return Status(CodeFor(rc), context + ": " + sqlite3_errmsg(db_) + " (" + path_ + ")");
}

Status SqliteDb::exec(const std::string& sql) {
  RPOINT_ASSERT_MAY_BLOCK("SQLite");
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errstr(rc);
    sqlite3_free(err);
    return Status(CodeFor(rc), "sqlite: " + msg + " (" + path_ + ")");
  }
  return Status::Ok();
}

// Every statement starts here: SQLite may read, lock and fsync.
Result<SqliteStmt> SqliteDb::prepare(const std::string& sql) {
  RPOINT_ASSERT_MAY_BLOCK("SQLite");
  sqlite3_stmt* stmt = nullptr;
  int rc = sqlite3_prepare_v2(db_, sql.c_str(), static_cast<int>(sql.size()), &stmt, nullptr);
  if (rc != SQLITE_OK) return error(rc, "prepare '" + sql + "'");
  return SqliteStmt(this, stmt, false);
}

Result<SqliteStmt> SqliteDb::prepare_cached(const std::string& sql) {
  RPOINT_ASSERT_MAY_BLOCK("SQLite");
  auto it = cache_.find(sql);
  if (it == cache_.end()) {
    sqlite3_stmt* stmt = nullptr;
    int rc = sqlite3_prepare_v3(db_, sql.c_str(), static_cast<int>(sql.size()),
                                SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    if (rc != SQLITE_OK) return error(rc, "prepare '" + sql + "'");
    it = cache_.emplace(sql, stmt).first;
  }
  return SqliteStmt(this, it->second, true);
}

SqliteStmt::SqliteStmt(SqliteStmt&& o) noexcept
    : db_(o.db_),
      stmt_(std::exchange(o.stmt_, nullptr)),
      cached_(o.cached_),
      bind_rc_(o.bind_rc_) {}

SqliteStmt& SqliteStmt::operator=(SqliteStmt&& o) noexcept {
  if (this != &o) {
    release();
    db_ = o.db_;
    stmt_ = std::exchange(o.stmt_, nullptr);
    cached_ = o.cached_;
    bind_rc_ = o.bind_rc_;
  }
  return *this;
}

SqliteStmt::~SqliteStmt() {
  release();
}

void SqliteStmt::release() {
  if (stmt_ == nullptr) return;
  if (cached_) {
    // Back to the cache, ready for its next user (and no read transaction left open).
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  } else {
    sqlite3_finalize(stmt_);
  }
  stmt_ = nullptr;
}

void SqliteStmt::reset() {
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
  bind_rc_ = SQLITE_OK;
}

SqliteStmt& SqliteStmt::bind_blob(int index, const void* data, size_t size) {
  int rc = sqlite3_bind_blob(stmt_, index, data, static_cast<int>(size), SQLITE_TRANSIENT);
  if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  return *this;
}

SqliteStmt& SqliteStmt::bind(int index, const std::string& value) {
  int rc = sqlite3_bind_text(stmt_, index, value.data(), static_cast<int>(value.size()),
                             SQLITE_TRANSIENT);
  if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  return *this;
}

SqliteStmt& SqliteStmt::bind(int index, int64_t value) {
  int rc = sqlite3_bind_int64(stmt_, index, value);
  if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  return *this;
}

Result<bool> SqliteStmt::step() {
  if (bind_rc_ != SQLITE_OK) return db_->error(bind_rc_, "bind");
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return db_->error(rc, std::string("step '") + sqlite3_sql(stmt_) + "'");
}

Status SqliteStmt::run() {
  Result<bool> r = step();
  if (!r.ok()) return r.status();
  return Status::Ok();
}

int64_t SqliteStmt::column_int(int index) const {
  return sqlite3_column_int64(stmt_, index);
}

std::string SqliteStmt::column_text(int index) const {
  const unsigned char* t = sqlite3_column_text(stmt_, index);
  int n = sqlite3_column_bytes(stmt_, index);
  return t ? std::string(reinterpret_cast<const char*>(t), static_cast<size_t>(n)) : std::string();
}

const void* SqliteStmt::column_blob(int index) const {
  return sqlite3_column_blob(stmt_, index);
}

size_t SqliteStmt::column_bytes(int index) const {
  return static_cast<size_t>(sqlite3_column_bytes(stmt_, index));
}

int SqliteStmt::changes() const {
  return sqlite3_changes(sqlite3_db_handle(stmt_));
}

Result<SqliteTxn> SqliteTxn::Begin(SqliteDb& db) {
  // IMMEDIATE takes the write lock now, so a busy database fails here, not at COMMIT.
  Status s = db.exec("BEGIN IMMEDIATE");
  if (!s.ok()) return s;
  return SqliteTxn(&db);
}

SqliteTxn::SqliteTxn(SqliteTxn&& o) noexcept : db_(o.db_), done_(std::exchange(o.done_, true)) {}

SqliteTxn::~SqliteTxn() {
  if (!done_) (void)db_->exec("ROLLBACK");
}

Status SqliteTxn::commit() {
  Status s = db_->exec("COMMIT");
  if (s.ok()) done_ = true;
  return s;
}

}  // namespace rpoint
