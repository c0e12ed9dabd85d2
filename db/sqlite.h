// Sqlite: a thin RAII layer over sqlite3* and sqlite3_stmt* that speaks Status.
//
// The one wrapper every database of the daemon goes through: metadata.db
// (disks/metadata_db, restore/restore_db) and each region's store.db
// (store/catalog). SqliteDb owns a connection opened through the fault
// injection VFS (common/fault_sqlite_vfs.h); SqliteStmt owns a prepared
// statement (finalized on destruction) or borrows one from the connection's
// cache (reset on destruction); SqliteTxn is a scoped BEGIN IMMEDIATE that
// rolls back unless commit() succeeded. Errors are Status, their code from
// the SQLite result (SQLITE_FULL is NoSpace, IOERR/CORRUPT IoError, BUSY
// Conflict, CONSTRAINT AlreadyExists), their message naming the file.
//
// Thread-safety: none. A SqliteDb and its statements belong to one user at a
// time (DiskService and the Catalog serialise access with their own mutexes).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "common/status.h"

struct sqlite3;
struct sqlite3_stmt;

namespace rpoint {

class SqliteStmt;

struct SqliteOptions {
  // The fault points SQLite's file I/O consults: "<kind>.write", "<kind>.sync".
  const char* fault_kind = "metadata";
  // Create the file when missing (a read connection to an existing db: false).
  bool create = true;
  // How long a statement waits for another connection's lock.
  int busy_timeout_ms = 5000;
};

class SqliteDb {
 public:
  // Opens the database file at `path`.
  static Result<std::unique_ptr<SqliteDb>> Open(const std::string& path,
                                                const SqliteOptions& options = {});
  ~SqliteDb();
  SqliteDb(const SqliteDb&) = delete;
  SqliteDb& operator=(const SqliteDb&) = delete;

  // Runs one or more SQL statements that return no rows of interest.
  Status exec(const std::string& sql);
  Result<SqliteStmt> prepare(const std::string& sql);
  // The same, from a per-connection cache (prepared once, reset after each
  // use): for statements a hot path runs again and again. At most one live
  // SqliteStmt per cached statement (each call site uses its own SQL).
  Result<SqliteStmt> prepare_cached(const std::string& sql);
  // Rows changed by the last INSERT/UPDATE/DELETE; rowid of the last INSERT.
  int changes() const;
  int64_t last_insert_rowid() const;
  // Status for the connection's last error, with `context` prefixed.
  Status error(int rc, const std::string& context) const;
  const std::string& path() const { return path_; }
  sqlite3* handle() { return db_; }

 private:
  SqliteDb(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  sqlite3* db_;
  std::string path_;
  std::map<std::string, sqlite3_stmt*> cache_;
};

class SqliteStmt {
 public:
  SqliteStmt(SqliteStmt&& o) noexcept;
  SqliteStmt& operator=(SqliteStmt&& o) noexcept;
  SqliteStmt(const SqliteStmt&) = delete;
  SqliteStmt& operator=(const SqliteStmt&) = delete;
  ~SqliteStmt();

  // Parameters are 1-based, as in SQL.
  SqliteStmt& bind(int index, const std::string& value);
  SqliteStmt& bind(int index, int64_t value);
  SqliteStmt& bind_blob(int index, const void* data, size_t size);
  // Ready for the next execution (same statement, no bindings).
  void reset();

  // Advances: true with a row available, false when done; errors as Status.
  Result<bool> step();
  // Runs a statement that returns no rows (INSERT/UPDATE/DELETE).
  Status run();
  int64_t column_int(int index) const;
  std::string column_text(int index) const;
  // A BLOB column: its bytes (nullptr for NULL) and length.
  const void* column_blob(int index) const;
  size_t column_bytes(int index) const;
  // Rows changed by the last run() on this connection.
  int changes() const;

 private:
  friend class SqliteDb;
  SqliteStmt(SqliteDb* db, sqlite3_stmt* stmt, bool cached)
      : db_(db), stmt_(stmt), cached_(cached) {}
  void release();
  SqliteDb* db_;
  sqlite3_stmt* stmt_;
  bool cached_;      // borrowed from db_'s cache: reset, not finalized
  int bind_rc_ = 0;  // first bind failure, reported by step()/run()
};

// BEGIN IMMEDIATE ... COMMIT, rolled back on destruction unless committed.
class SqliteTxn {
 public:
  static Result<SqliteTxn> Begin(SqliteDb& db);
  SqliteTxn(SqliteTxn&& o) noexcept;
  SqliteTxn& operator=(SqliteTxn&&) = delete;
  ~SqliteTxn();
  Status commit();

 private:
  explicit SqliteTxn(SqliteDb* db) : db_(db) {}
  SqliteDb* db_;
  bool done_ = false;
};

}  // namespace rpoint
