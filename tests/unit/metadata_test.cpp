// MetadataDb, the SQLite wrapper and the schema migrations (disks/metadata_db.h,
// db/sqlite.h, db/migrations.h), store.db included.
#include <doctest/doctest.h>
#include <stdlib.h>

#include <filesystem>

#include "db/migrations.h"
#include "disks/metadata_db.h"
#include "store/catalog.h"

using namespace rpoint;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/rpoint-meta-XXXXXX";
    REQUIRE(mkdtemp(t) != nullptr);
    path = t;
  }
  ~TempDir() { fs::remove_all(path); }
};

std::string Pragma(SqliteDb& db, const std::string& name) {
  auto st = db.prepare("PRAGMA " + name);
  REQUIRE(st.ok());
  auto row = st->step();
  REQUIRE(row.ok());
  REQUIRE(row.value());
  return st->column_text(0);
}

DiskRow Row(const std::string& name, const std::string& path) {
  DiskRow r;
  r.name = name;
  r.path = path;
  r.size_bytes = 4096;
  r.kind = "managed";
  r.time_created = "2026-11-01T00:00:00.000000Z";
  return r;
}

}  // namespace

TEST_CASE("a new database is migrated to the latest schema, WAL + synchronous=FULL") {
  TempDir t;
  auto m = MetadataDb::Open(t.path + "/m.db");
  REQUIRE_MESSAGE(m.ok(), m.status().ToString());
  CHECK(m.value()->schema_version().value() == MetadataDb::LatestSchemaVersion());
  CHECK(MetadataDb::LatestSchemaVersion() >= 1);
  CHECK(Pragma(m.value()->db(), "journal_mode") == "wal");
  CHECK(Pragma(m.value()->db(), "synchronous") == "2");  // FULL
}

TEST_CASE("disk rows: insert, unique name and path, update, delete, reopen") {
  TempDir t;
  {
    auto m = MetadataDb::Open(t.path + "/m.db");
    REQUIRE(m.ok());
    auto& db = *m.value();
    REQUIRE(db.insert_disk(Row("b", "/x/b")).ok());
    REQUIRE(db.insert_disk(Row("a", "/x/a")).ok());
    CHECK(db.insert_disk(Row("a", "/x/other")).code() == Code::kAlreadyExists);
    CHECK(db.insert_disk(Row("c", "/x/a")).code() == Code::kAlreadyExists);
    CHECK(db.update_disk_size("a", 8192).ok());
    CHECK(db.update_disk_size("zz", 8192).code() == Code::kNotFound);
    CHECK(db.delete_disk("zz").code() == Code::kNotFound);
    DiskRow bad = Row("d", "/x/d");
    bad.size_bytes = 0;
    CHECK_FALSE(db.insert_disk(bad).ok());  // CHECK constraint
  }
  auto m = MetadataDb::Open(t.path + "/m.db");
  REQUIRE(m.ok());
  auto rows = m.value()->list_disks();
  REQUIRE(rows.ok());
  REQUIRE(rows->size() == 2);
  CHECK(rows.value()[0].name == "a");  // ordered by name
  CHECK(rows.value()[0].size_bytes == 8192);
  CHECK(rows.value()[1].path == "/x/b");
  CHECK(m.value()->delete_disk("a").ok());
  CHECK(m.value()->list_disks()->size() == 1);
}

TEST_CASE("transactions roll back unless committed") {
  TempDir t;
  auto m = MetadataDb::Open(t.path + "/m.db");
  REQUIRE(m.ok());
  SqliteDb& db = m.value()->db();
  {
    auto txn = SqliteTxn::Begin(db);
    REQUIRE(txn.ok());
    REQUIRE(m.value()->insert_disk(Row("gone", "/x/gone")).ok());
  }
  CHECK(m.value()->list_disks()->empty());
  {
    auto txn = SqliteTxn::Begin(db);
    REQUIRE(txn.ok());
    REQUIRE(m.value()->insert_disk(Row("kept", "/x/kept")).ok());
    REQUIRE(txn->commit().ok());
  }
  CHECK(m.value()->list_disks()->size() == 1);
}

TEST_CASE("a database file that is not SQLite is an error, not a crash") {
  TempDir t;
  {
    FILE* f = fopen((t.path + "/m.db").c_str(), "w");
    REQUIRE(f);
    fputs("this is not a database, just text that is long enough to have a header........", f);
    fclose(f);
  }
  auto m = MetadataDb::Open(t.path + "/m.db");
  CHECK_FALSE(m.ok());
}

// store.db goes through the same wrapper and migration runner as metadata.db
// (db/migrations.h): a region written before store.db was versioned (no
// schema_version table) opens and is stamped version 1 with its rows intact,
// and a store.db from a newer rpointd is refused instead of misread.
TEST_CASE("store.db: an unversioned region is adopted at version 1, a newer one refused") {
  TempDir t;
  const std::string path = t.path + "/store.db";
  {
    auto db = SqliteDb::Open(path);
    REQUIRE(db.ok());
    // The layout store/catalog.cpp created before db/migrations.cpp existed.
    REQUIRE(db.value()
                ->exec("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "INSERT INTO meta VALUES('format_version', '1');"
                       "CREATE TABLE packs(id INTEGER PRIMARY KEY, bytes INTEGER NOT NULL, "
                       "objects INTEGER NOT NULL, created_ns INTEGER NOT NULL);"
                       "INSERT INTO packs VALUES(7, 4096, 1, 1);")
                .ok());
  }
  {
    auto c = store::Catalog::Open(path);
    REQUIRE_MESSAGE(c.ok(), c.status().ToString());
    auto packs = c.value()->packs();
    REQUIRE(packs.ok());
    REQUIRE(packs->size() == 1);
    CHECK(packs->front().id == 7);
  }
  {
    auto db = SqliteDb::Open(path);
    REQUIRE(db.ok());
    auto v = db::SchemaVersion(*db.value(), db::StoreSchema());
    REQUIRE(v.ok());
    CHECK(v.value() == db::StoreSchema().latest());
    REQUIRE(db.value()->exec("UPDATE schema_version SET version = 999").ok());
  }
  auto c = store::Catalog::Open(path);
  REQUIRE(!c.ok());
  CHECK(c.status().code() == Code::kUnsupported);
  CHECK(c.status().message().find("store database") != std::string::npos);
}
