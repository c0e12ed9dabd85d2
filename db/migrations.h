// Migrations: the versioned schema of every database the daemon keeps, in one
// place: metadata.db (disks/, restore/) and each region's store.db (store/).
//
// A schema is an append-only list of SQL scripts; script i takes a database
// from version i to i+1. The version is recorded in a one-row table
// schema_version. Migrate() applies, in order and each in its own
// transaction, every script newer than the recorded version, and refuses a
// database written by a newer rpointd rather than misread it. A released
// script is never edited: databases in the field already ran it.
//
// Thread-safety: Migrate() runs on the caller's connection, which the caller
// owns for the duration (it is called from the databases' Open()).
#pragma once

#include <span>
#include <string>

#include "common/status.h"
#include "db/sqlite.h"

namespace rpoint::db {

struct Schema {
  // In messages and logs: "metadata database <path> ...".
  const char* label;
  std::span<const char* const> migrations;
  int latest() const { return static_cast<int>(migrations.size()); }
};

// metadata.db: disks (disks/metadata_db), VMs, collections, restore points,
// operations and tracking bases (restore/restore_db).
const Schema& MetadataSchema();
// store.db of a region: the chunk index, packs, point records (store/catalog).
const Schema& StoreSchema();

// The version recorded in `db` (0 for a database no migration has touched).
Result<int> SchemaVersion(SqliteDb& db, const Schema& schema);
// Brings `db` to schema.latest(); Unsupported when it is already newer.
Status Migrate(SqliteDb& db, const Schema& schema);

}  // namespace rpoint::db
