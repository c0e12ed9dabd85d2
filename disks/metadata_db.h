// MetadataDb: the daemon's durable metadata (SQLite): the disks table, and the
// connection restore/restore_db shares for its tables.
//
// Opening applies the schema migrations of metadata.db (db/migrations.cpp,
// every table of the file, restore/'s included), so later features add tables
// by appending a migration there. A database written by a newer rpointd is
// refused rather than misread. The connection runs in WAL mode with synchronous=FULL: a committed
// row survives power loss, which is what "the disk exists" promises.
//
// Thread-safety: none; the owner serialises calls (DiskService holds its mutex).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "db/sqlite.h"

namespace rpoint {

// One row of the disks table.
struct DiskRow {
  std::string name;
  std::string path;
  uint64_t size_bytes = 0;
  bool adopted = false;
  bool block_device = false;
  std::string kind;
  std::string time_created;
  uint32_t tracking_granularity = 64 * 1024;
  std::string provisioning_state = "Succeeded";  // Creating while a restore fills it
  std::string source_resource_id;                // restored disks: the disk restore point
  std::string export_mode = "nbd";               // nbd | ublk
  int ublk_dev_id = -1;                          // ublk: the kernel device number, -1 none yet
};

class MetadataDb {
 public:
  static Result<std::unique_ptr<MetadataDb>> Open(const std::string& path);

  // The schema version this binary writes (the number of migrations it knows).
  static int LatestSchemaVersion();
  Result<int> schema_version();

  Result<std::vector<DiskRow>> list_disks();
  // AlreadyExists when the name (or the path) is taken.
  Status insert_disk(const DiskRow& row);
  Status update_disk_export(const std::string& name, const std::string& export_mode,
                            int ublk_dev_id);
  Status update_disk_size(const std::string& name, uint64_t size_bytes);
  Status update_disk_provisioning(const std::string& name, const std::string& state);
  // NotFound when there is no such row.
  Status delete_disk(const std::string& name);

  SqliteDb& db() { return *db_; }

 private:
  explicit MetadataDb(std::unique_ptr<SqliteDb> db) : db_(std::move(db)) {}

  std::unique_ptr<SqliteDb> db_;
};

}  // namespace rpoint
