// Sqlite: a thin RAII layer over sqlite3* and sqlite3_stmt* that speaks Status.
//
// SqliteDb owns a connection; SqliteStmt owns a prepared statement (finalized
// on destruction); SqliteTxn is a scoped BEGIN IMMEDIATE that rolls back unless
// commit() succeeded. Only what the metadata store needs, nothing more.
//
// Thread-safety: none. A SqliteDb and its statements belong to one user at a
// time (DiskService serialises access with its own mutex).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

struct sqlite3;
struct sqlite3_stmt;

namespace rpoint {

class SqliteStmt;

class SqliteDb {
 public:
  // Opens (creating if missing) the database file at `path`.
  static Result<std::unique_ptr<SqliteDb>> Open(const std::string& path);
  ~SqliteDb();
  SqliteDb(const SqliteDb&) = delete;
  SqliteDb& operator=(const SqliteDb&) = delete;

  // Runs one or more SQL statements that return no rows of interest.
  Status exec(const std::string& sql);
  Result<SqliteStmt> prepare(const std::string& sql);
  // Status for the connection's last error, with `context` prefixed.
  Status error(int rc, const std::string& context) const;
  const std::string& path() const { return path_; }
  sqlite3* handle() { return db_; }

 private:
  SqliteDb(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  sqlite3* db_;
  std::string path_;
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

  // Advances: true with a row available, false when done; errors as Status.
  Result<bool> step();
  // Runs a statement that returns no rows (INSERT/UPDATE/DELETE).
  Status run();
  int64_t column_int(int index) const;
  std::string column_text(int index) const;
  // Rows changed by the last run() on this connection.
  int changes() const;

 private:
  friend class SqliteDb;
  SqliteStmt(SqliteDb* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  SqliteDb* db_;
  sqlite3_stmt* stmt_;
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
