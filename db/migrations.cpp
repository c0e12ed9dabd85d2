#include "db/migrations.h"

#include <spdlog/spdlog.h>

#include <iterator>

namespace rpoint::db {

namespace {

// metadata.db. Migration i takes the schema from version i to i+1.
const char* const kMetadataMigrations[] = {
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
    // 5: several collections per VM (source_vm no longer UNIQUE), so one
    // tracking base per (disk, collection), with the tracker generation that
    // collection captured through and the tracker's identity. Tables are
    // rebuilt (SQLite cannot drop a constraint); Migrate runs with foreign
    // keys off (disks/metadata_db.cpp turns them on after), as SQLite's
    // table rebuild procedure asks.
    R"sql(
    CREATE TABLE collections_v5 (
      name         TEXT PRIMARY KEY NOT NULL,
      source_vm    TEXT NOT NULL,
      region       TEXT NOT NULL,
      time_created TEXT NOT NULL
    );
    INSERT INTO collections_v5 (name, source_vm, region, time_created)
      SELECT name, source_vm, region, time_created FROM collections;
    DROP TABLE collections;
    ALTER TABLE collections_v5 RENAME TO collections;
    CREATE INDEX collections_by_vm ON collections(source_vm);
    CREATE TABLE tracking_bases_v5 (
      disk          TEXT NOT NULL,
      collection    TEXT NOT NULL,
      restore_point TEXT NOT NULL,
      store_point   INTEGER NOT NULL,
      granularity   INTEGER NOT NULL,
      retained      INTEGER NOT NULL DEFAULT 0,
      generation    INTEGER NOT NULL DEFAULT 0,
      tracker_id    INTEGER NOT NULL DEFAULT 0,
      PRIMARY KEY (disk, collection)
    );
    INSERT INTO tracking_bases_v5 (disk, collection, restore_point, store_point, granularity,
                                   retained)
      SELECT disk, collection, restore_point, store_point, granularity, retained
      FROM tracking_bases;
    DROP TABLE tracking_bases;
    ALTER TABLE tracking_bases_v5 RENAME TO tracking_bases;
    -- A copy of a point of another collection (another region) names it.
    ALTER TABLE restore_points ADD COLUMN source_restore_point TEXT NOT NULL DEFAULT '';
    )sql",
    // 6: access grants (restore/access_grants.h): the SHA-256 of each token,
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
    // 7: how a disk is served (nbd | ublk) and its ublk device number, kept
    // so a restarted daemon recovers the same /dev/ublkbN.
    R"sql(
    ALTER TABLE disks ADD COLUMN export_mode TEXT NOT NULL DEFAULT 'nbd';
    ALTER TABLE disks ADD COLUMN ublk_dev_id INTEGER NOT NULL DEFAULT -1;
    )sql",
};

// store.db. Version 1 is the layout regions had before store.db was
// versioned (hence IF NOT EXISTS: an old region's tables are already there and
// only gain the schema_version row). The store's own format version (the pack
// and point file layout) stays in its meta table, checked by the Catalog.
const char* const kStoreMigrations[] = {
    // 1: chunk index, packs, points, quarantined objects.
    R"sql(
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
    )sql",
};

}  // namespace

const Schema& MetadataSchema() {
  static const Schema s{"metadata database", kMetadataMigrations};
  return s;
}

const Schema& StoreSchema() {
  static const Schema s{"store database", kStoreMigrations};
  return s;
}

Result<int> SchemaVersion(SqliteDb& db, const Schema& schema) {
  auto st = db.prepare("SELECT version FROM schema_version");
  if (!st.ok()) return st.status();
  auto row = st->step();
  if (!row.ok()) return row.status();
  if (!row.value()) {
    return Status::IoError(std::string(schema.label) + " " + db.path() +
                           ": schema_version table is empty");
  }
  return static_cast<int>(st->column_int(0));
}

Status Migrate(SqliteDb& db, const Schema& schema) {
  {
    auto txn = SqliteTxn::Begin(db);
    if (!txn.ok()) return txn.status();
    Status s = db.exec(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);"
        "INSERT INTO schema_version (version) SELECT 0 "
        "WHERE NOT EXISTS (SELECT 1 FROM schema_version);");
    if (!s.ok()) return s;
    s = txn->commit();
    if (!s.ok()) return s;
  }
  auto v = SchemaVersion(db, schema);
  if (!v.ok()) return v.status();
  const int latest = schema.latest();
  if (v.value() > latest) {
    return Status::Unsupported(std::string(schema.label) + " " + db.path() +
                               " has schema version " + std::to_string(v.value()) +
                               ", newer than this rpointd knows (" + std::to_string(latest) +
                               "); upgrade rpointd");
  }
  for (int from = v.value(); from < latest; ++from) {
    auto txn = SqliteTxn::Begin(db);
    if (!txn.ok()) return txn.status();
    Status s = db.exec(schema.migrations[static_cast<size_t>(from)]);
    if (!s.ok()) {
      return Status(s.code(), std::string("migrating ") + schema.label + " to version " +
                                  std::to_string(from + 1) + ": " + s.message());
    }
    auto up = db.prepare("UPDATE schema_version SET version = ?1");
    if (!up.ok()) return up.status();
    s = up->bind(1, int64_t{from + 1}).run();
    if (!s.ok()) return s;
    s = txn->commit();
    if (!s.ok()) return s;
    spdlog::info("{} {}: schema version {} -> {}", schema.label, db.path(), from, from + 1);
  }
  return Status::Ok();
}

}  // namespace rpoint::db
