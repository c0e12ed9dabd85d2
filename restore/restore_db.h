// RestoreDb: the restore point records (VMs, collections, restore points,
// disk restore points, operations, tracking bases) in the daemon's metadata
// database, on RestoreService's own connection.
//
// The tables are created by the metadata.db migrations (db/migrations.cpp),
// so one schema version covers the whole file. Each method is one statement
// or one transaction: save_point() writes a point, its disk points, its
// operation and (on success) the disks' new tracking bases atomically, which
// is what lets a point become Succeeded and the parents of the next points
// move in the same commit.
//
// Thread-safety: none; RestoreService serialises calls with its mutex.
#pragma once

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "disks/metadata_db.h"
#include "restore/restore_service.h"

namespace rpoint {

// The restore point of one collection a disk's next point of that collection
// is incremental against, and the tracker generation it captured through.
struct TrackingBase {
  std::string disk;
  std::string collection;
  std::string restore_point;
  uint64_t store_point = 0;
  uint32_t granularity = 0;
  // The restore point was deleted while this was the disk's base: no record
  // names store_point any more, it is kept only as the next point's parent.
  bool retained = false;
  // The tracker generation the point's cut froze: the collection's next point
  // copies the generations after it. 0 with tracker_id 0: recorded before
  // several collections per VM existed, when the tracker kept only what the
  // one collection had not captured (every frozen generation).
  uint64_t generation = 0;
  uint64_t tracker_id = 0;  // ChangeTracker::id() of the disk at the cut
};

class RestoreDb {
 public:
  static Result<std::unique_ptr<RestoreDb>> Open(const std::string& path);

  // ---- VMs ----
  Result<std::optional<VmRecord>> get_vm(const std::string& name);
  Result<std::vector<VmRecord>> list_vms();
  // Inserts or replaces the VM and its disk list (one transaction).
  Status put_vm(const VmRecord& vm);
  Status delete_vm(const std::string& name);
  Result<std::optional<std::string>> vm_of_disk(const std::string& disk);

  // ---- collections ----
  Result<std::optional<CollectionRecord>> get_collection(const std::string& name);
  Result<std::vector<CollectionRecord>> list_collections();
  Status insert_collection(const CollectionRecord& c);
  // Also its tracking bases; its points must be gone already.
  Status delete_collection(const std::string& name);

  // ---- restore points ----
  Result<std::optional<RestorePointRecord>> get_point(const std::string& collection,
                                                      const std::string& name);
  // In creation order. collection empty: every collection.
  Result<std::vector<RestorePointRecord>> list_points(const std::string& collection);
  // Inserts or updates the point and replaces its disk points; with `op` also
  // that operation, with `bases` also those disks' tracking bases. One transaction.
  Status save_point(const RestorePointRecord& p, const OperationRecord* op = nullptr,
                    const std::vector<TrackingBase>* bases = nullptr);
  Status delete_point(const std::string& collection, const std::string& name);
  // Marks the point Deleting and, in the same transaction, every tracking base
  // it is for a disk still in the collection's VM as retained (its store point
  // outlives the point). Returns those bases.
  Result<std::vector<TrackingBase>> mark_point_deleting(const std::string& collection,
                                                        const std::string& name);

  Result<std::optional<TrackingBase>> tracking_base(const std::string& disk,
                                                    const std::string& collection);
  // Every collection's base of the disk.
  Result<std::vector<TrackingBase>> bases_of_disk(const std::string& disk);
  Result<std::vector<TrackingBase>> retained_bases();
  // Forgets the (not retained) bases of disks their collection's VM no longer
  // has: that collection's next point of the disk is full anyway, and the
  // base must not keep the disk's tracker from retiring.
  Status drop_stale_bases();
  // Forgets a retained base (only if it is still that store point, retained).
  Status drop_retained_base(const std::string& disk, uint64_t store_point);

  // ---- operations ----
  Result<std::optional<OperationRecord>> get_operation(const std::string& id);
  Status save_operation(const OperationRecord& op);
  // Marks every InProgress operation Failed (start-up after a crash), except
  // those in `keep` (jobs that resume).
  Status fail_in_progress_operations(const std::string& message, const std::string& end_time,
                                     const std::set<std::string>& keep = {});
  // Every operation, newest (by start time) first.
  Result<std::vector<OperationRecord>> list_operations();
  // Deletes ended operations that ended before `ended_before` (RFC 3339, the
  // fixed-width form NowRfc3339 writes, so text order is time order) and,
  // beyond the newest `keep_count` ended ones, the older ones. Returns how
  // many went. InProgress operations are never deleted.
  Result<int64_t> prune_operations(const std::string& ended_before, unsigned keep_count);

 private:
  explicit RestoreDb(std::unique_ptr<MetadataDb> db) : meta_(std::move(db)) {}
  SqliteDb& db() { return meta_->db(); }
  Status save_operation_locked(const OperationRecord& op);
  Result<std::vector<DiskRestorePointRecord>> disk_points(const std::string& collection,
                                                          const std::string& point);

  std::unique_ptr<MetadataDb> meta_;
};

}  // namespace rpoint
