#include "db/sqlite.h"

#include <sqlite3.h>

#include <utility>

#include "common/fault_sqlite_vfs.h"

namespace rpoint {

namespace {

// SQLITE_FULL / IOERR / CANTOPEN mean the storage under the database failed,
// not that the caller asked for something wrong.
Code CodeFor(int rc) {
  switch (rc & 0xff) {
    case SQLITE_FULL: return Code::kNoSpace;
    case SQLITE_CONSTRAINT: return Code::kAlreadyExists;
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return Code::kConflict;
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_AUTH: return Code::kPermissionDenied;
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return Code::kIoError;
    default: return Code::kInternal;
  }
}

}  // namespace

Result<std::unique_ptr<SqliteDb>> SqliteDb::Open(const std::string& path) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                           fault::SqliteVfs("metadata"));
  if (rc != SQLITE_OK) {
    std::string msg = raw ? sqlite3_errmsg(raw) : sqlite3_errstr(rc);
    sqlite3_close(raw);  // a handle is returned even on failure; NULL is a no-op
    return Status(CodeFor(rc), "open metadata database " + path + ": " + msg);
  }
  sqlite3_extended_result_codes(raw, 1);
  // Another process (an admin's sqlite3 shell) holding a lock briefly must not fail requests.
  sqlite3_busy_timeout(raw, 5000);
  return std::unique_ptr<SqliteDb>(new SqliteDb(raw, path));
}

SqliteDb::~SqliteDb() { sqlite3_close_v2(db_); }

Status SqliteDb::error(int rc, const std::string& context) const {
  return Status(CodeFor(rc), context + ": " + sqlite3_errmsg(db_) + " (" + path_ + ")");
}

Status SqliteDb::exec(const std::string& sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errstr(rc);
    sqlite3_free(err);
    return Status(CodeFor(rc), "sqlite: " + msg + " (" + path_ + ")");
  }
  return Status::Ok();
}

Result<SqliteStmt> SqliteDb::prepare(const std::string& sql) {
  sqlite3_stmt* stmt = nullptr;
  int rc = sqlite3_prepare_v2(db_, sql.c_str(), static_cast<int>(sql.size()), &stmt, nullptr);
  if (rc != SQLITE_OK) return error(rc, "prepare '" + sql + "'");
  return SqliteStmt(this, stmt);
}

SqliteStmt::SqliteStmt(SqliteStmt&& o) noexcept
    : db_(o.db_), stmt_(std::exchange(o.stmt_, nullptr)), bind_rc_(o.bind_rc_) {}

SqliteStmt& SqliteStmt::operator=(SqliteStmt&& o) noexcept {
  if (this != &o) {
    sqlite3_finalize(stmt_);
    db_ = o.db_;
    stmt_ = std::exchange(o.stmt_, nullptr);
    bind_rc_ = o.bind_rc_;
  }
  return *this;
}

SqliteStmt::~SqliteStmt() { sqlite3_finalize(stmt_); }

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

int64_t SqliteStmt::column_int(int index) const { return sqlite3_column_int64(stmt_, index); }

std::string SqliteStmt::column_text(int index) const {
  const unsigned char* t = sqlite3_column_text(stmt_, index);
  int n = sqlite3_column_bytes(stmt_, index);
  return t ? std::string(reinterpret_cast<const char*>(t), static_cast<size_t>(n)) : std::string();
}

int SqliteStmt::changes() const { return sqlite3_changes(sqlite3_db_handle(stmt_)); }

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
