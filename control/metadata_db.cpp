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
    // 2: per-disk change tracking granularity; disks being filled by a restore.
    R"sql(
    ALTER TABLE disks ADD COLUMN tracking_granularity INTEGER NOT NULL DEFAULT 65536;
    ALTER TABLE disks ADD COLUMN provisioning_state TEXT NOT NULL DEFAULT 'Succeeded';
    ALTER TABLE disks ADD COLUMN source_resource_id TEXT NOT NULL DEFAULT '';
    )sql",
    // 3: VMs, restore point collections, restore points, operations (restore/).
    R"sql(
    CREATE TABLE vms (
      name          TEXT PRIMARY KEY NOT NULL,
      configuration TEXT NOT NULL,
      time_created  TEXT NOT NULL
    );
    CREATE TABLE vm_disks (
      vm       TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
      disk     TEXT NOT NULL UNIQUE,
      position INTEGER NOT NULL,
      PRIMARY KEY (vm, disk)
    );
    CREATE TABLE collections (
      name         TEXT PRIMARY KEY NOT NULL,
      source_vm    TEXT NOT NULL UNIQUE,
      region       TEXT NOT NULL,
      time_created TEXT NOT NULL
    );
    CREATE TABLE restore_points (
      collection         TEXT NOT NULL REFERENCES collections(name),
      name               TEXT NOT NULL,
      seq                INTEGER NOT NULL,
      consistency_mode   TEXT NOT NULL,
      exclude_disks      TEXT NOT NULL,
      provisioning_state TEXT NOT NULL,
      time_created       TEXT NOT NULL,
      source_metadata    TEXT NOT NULL,
      operation_id       TEXT NOT NULL,
      cut_pause_ns       INTEGER NOT NULL DEFAULT -1,
      error_code         TEXT NOT NULL DEFAULT '',
      error_message      TEXT NOT NULL DEFAULT '',
      PRIMARY KEY (collection, name)
    );
    CREATE TABLE disk_restore_points (
      collection         TEXT NOT NULL,
      restore_point      TEXT NOT NULL,
      disk               TEXT NOT NULL,
      position           INTEGER NOT NULL,
      size_bytes         INTEGER NOT NULL,
      granularity        INTEGER NOT NULL,
      full               INTEGER NOT NULL,
      status             TEXT NOT NULL,
      blocks_to_copy     INTEGER NOT NULL DEFAULT 0,
      blocks_copied      INTEGER NOT NULL DEFAULT 0,
      bytes_stored       INTEGER NOT NULL DEFAULT 0,
      store_point        INTEGER NOT NULL DEFAULT 0,
      parent_store_point INTEGER NOT NULL DEFAULT 0,
      PRIMARY KEY (collection, restore_point, disk),
      FOREIGN KEY (collection, restore_point) REFERENCES restore_points(collection, name)
        ON DELETE CASCADE
    );
    CREATE TABLE operations (
      id               TEXT PRIMARY KEY NOT NULL,
      kind             TEXT NOT NULL,
      resource_id      TEXT NOT NULL,
      status           TEXT NOT NULL,
      percent_complete INTEGER NOT NULL DEFAULT 0,
      start_time       TEXT NOT NULL,
      end_time         TEXT NOT NULL DEFAULT '',
      error_code       TEXT NOT NULL DEFAULT '',
      error_message    TEXT NOT NULL DEFAULT '',
      result           TEXT NOT NULL DEFAULT 'null'
    );
    -- The restore point each disk's change tracker last retired through: the
    -- parent of the disk's next incremental point (if still usable).
    CREATE TABLE tracking_bases (
      disk          TEXT PRIMARY KEY NOT NULL,
      collection    TEXT NOT NULL,
      restore_point TEXT NOT NULL,
      store_point   INTEGER NOT NULL,
      granularity   INTEGER NOT NULL
    );
    )sql",
    // 4: a base whose restore point was deleted keeps its store point
    // (retained = 1) so the disk's next point stays incremental.
    R"sql(
    ALTER TABLE tracking_bases ADD COLUMN retained INTEGER NOT NULL DEFAULT 0;
    )sql",
    // 5: access grants (restore/access_grants.h): the SHA-256 of each token,
    // never the token; point_time binds a grant to the point it was made for.
    R"sql(
    CREATE TABLE access_grants (
      token_sha256  TEXT PRIMARY KEY NOT NULL,
      collection    TEXT NOT NULL,
      restore_point TEXT NOT NULL,
      disk          TEXT NOT NULL,
      point_time    TEXT NOT NULL,
      expiry_ms     INTEGER NOT NULL,
      UNIQUE (collection, restore_point, disk)
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
      "SELECT name, path, size_bytes, adopted, block_device, kind, time_created, "
      "tracking_granularity, provisioning_state, source_resource_id FROM disks ORDER BY name");
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
    r.tracking_granularity = static_cast<uint32_t>(st->column_int(7));
    r.provisioning_state = st->column_text(8);
    r.source_resource_id = st->column_text(9);
    out.push_back(std::move(r));
  }
  return out;
}

Status MetadataDb::insert_disk(const DiskRow& r) {
  auto st = db_->prepare(
      "INSERT INTO disks (name, path, size_bytes, adopted, block_device, kind, time_created, "
      "tracking_granularity, provisioning_state, source_resource_id) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)");
  if (!st.ok()) return st.status();
  // One statement is its own transaction; with synchronous=FULL it is durable on return.
  return st->bind(1, r.name)
      .bind(2, r.path)
      .bind(3, static_cast<int64_t>(r.size_bytes))
      .bind(4, int64_t{r.adopted})
      .bind(5, int64_t{r.block_device})
      .bind(6, r.kind)
      .bind(7, r.time_created)
      .bind(8, int64_t{r.tracking_granularity})
      .bind(9, r.provisioning_state)
      .bind(10, r.source_resource_id)
      .run();
}

Status MetadataDb::update_disk_provisioning(const std::string& name, const std::string& state) {
  auto st = db_->prepare("UPDATE disks SET provisioning_state = ?2 WHERE name = ?1");
  if (!st.ok()) return st.status();
  Status s = st->bind(1, name).bind(2, state).run();
  if (!s.ok()) return s;
  if (st->changes() == 0) return Status::NotFound("no disk named '" + name + "'");
  return Status::Ok();
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
