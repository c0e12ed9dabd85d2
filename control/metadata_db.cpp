#include "control/metadata_db.h"

#include <spdlog/spdlog.h>

#include <iterator>

namespace rpoint {

namespace {

// Migration i takes the schema from version i to i+1. Append only: a released
// migration is never edited, since databases in the field already ran it.
const char* const kMigrations[] = {
    // 1: managed disks.
    R"sql(
    CREATE TABLE disks (
      name         TEXT PRIMARY KEY NOT NULL,
      path         TEXT NOT NULL UNIQUE,
      size_bytes   INTEGER NOT NULL CHECK (size_bytes > 0),
      adopted      INTEGER NOT NULL CHECK (adopted IN (0, 1)),
      block_device INTEGER NOT NULL CHECK (block_device IN (0, 1)),
      kind         TEXT NOT NULL,
      time_created TEXT NOT NULL
    );
    )sql",
};

constexpr int kLatest = static_cast<int>(std::size(kMigrations));

}  // namespace

int MetadataDb::LatestSchemaVersion() { return kLatest; }

Result<std::unique_ptr<MetadataDb>> MetadataDb::Open(const std::string& path) {
  auto db = SqliteDb::Open(path);
  if (!db.ok()) return db.status();
  std::unique_ptr<MetadataDb> m(new MetadataDb(std::move(db).value()));
  // WAL: readers never block the writer; FULL: the WAL is fsynced at every
  // commit, so an acknowledged change survives a power cut (NORMAL would not).
  Status s = m->db_->exec("PRAGMA journal_mode=WAL");
  if (s.ok()) s = m->db_->exec("PRAGMA synchronous=FULL");
  if (s.ok()) s = m->db_->exec("PRAGMA foreign_keys=ON");
  if (s.ok()) s = m->migrate();
  if (!s.ok()) return s;
  return m;
}

Result<int> MetadataDb::schema_version() {
  auto st = db_->prepare("SELECT version FROM schema_version");
  if (!st.ok()) return st.status();
  auto row = st->step();
  if (!row.ok()) return row.status();
  if (!row.value()) return Status::IoError("metadata database " + db_->path() +
                                           ": schema_version table is empty");
  return static_cast<int>(st->column_int(0));
}

Status MetadataDb::migrate() {
  {
    auto txn = SqliteTxn::Begin(*db_);
    if (!txn.ok()) return txn.status();
    Status s = db_->exec(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);"
        "INSERT INTO schema_version (version) SELECT 0 "
        "WHERE NOT EXISTS (SELECT 1 FROM schema_version);");
    if (!s.ok()) return s;
    s = txn->commit();
    if (!s.ok()) return s;
  }
  auto v = schema_version();
  if (!v.ok()) return v.status();
  if (v.value() > kLatest) {
    return Status::Unsupported("metadata database " + db_->path() + " has schema version " +
                               std::to_string(v.value()) + ", newer than this rpointd knows (" +
                               std::to_string(kLatest) + "); upgrade rpointd");
  }
  for (int from = v.value(); from < kLatest; ++from) {
    auto txn = SqliteTxn::Begin(*db_);
    if (!txn.ok()) return txn.status();
    Status s = db_->exec(kMigrations[from]);
    if (!s.ok()) {
      return Status(s.code(), "migrating metadata schema to version " + std::to_string(from + 1) +
                                  ": " + s.message());
    }
    auto up = db_->prepare("UPDATE schema_version SET version = ?1");
    if (!up.ok()) return up.status();
    s = up->bind(1, int64_t{from + 1}).run();
    if (!s.ok()) return s;
    s = txn->commit();
    if (!s.ok()) return s;
    spdlog::info("metadata database {}: schema version {} -> {}", db_->path(), from, from + 1);
  }
  return Status::Ok();
}

Result<std::vector<DiskRow>> MetadataDb::list_disks() {
  auto st = db_->prepare(
      "SELECT name, path, size_bytes, adopted, block_device, kind, time_created "
      "FROM disks ORDER BY name");
  if (!st.ok()) return st.status();
  std::vector<DiskRow> out;
  for (;;) {
    auto row = st->step();
    if (!row.ok()) return row.status();
    if (!row.value()) break;
    DiskRow r;
    r.name = st->column_text(0);
    r.path = st->column_text(1);
    r.size_bytes = static_cast<uint64_t>(st->column_int(2));
    r.adopted = st->column_int(3) != 0;
    r.block_device = st->column_int(4) != 0;
    r.kind = st->column_text(5);
    r.time_created = st->column_text(6);
    out.push_back(std::move(r));
  }
  return out;
}

Status MetadataDb::insert_disk(const DiskRow& r) {
  auto st = db_->prepare(
      "INSERT INTO disks (name, path, size_bytes, adopted, block_device, kind, time_created) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
  if (!st.ok()) return st.status();
  // One statement is its own transaction; with synchronous=FULL it is durable on return.
  return st->bind(1, r.name)
      .bind(2, r.path)
      .bind(3, static_cast<int64_t>(r.size_bytes))
      .bind(4, int64_t{r.adopted})
      .bind(5, int64_t{r.block_device})
      .bind(6, r.kind)
      .bind(7, r.time_created)
      .run();
}

Status MetadataDb::update_disk_size(const std::string& name, uint64_t size_bytes) {
  auto st = db_->prepare("UPDATE disks SET size_bytes = ?2 WHERE name = ?1");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).bind(2, static_cast<int64_t>(size_bytes)).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("no disk named '" + name + "'");
  return Status::Ok();
}

Status MetadataDb::delete_disk(const std::string& name) {
  auto st = db_->prepare("DELETE FROM disks WHERE name = ?1");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("no disk named '" + name + "'");
  return Status::Ok();
}

}  // namespace rpoint
