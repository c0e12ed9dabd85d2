// RestoreService: VMs, restore point collections, restore points, their
// long-running operations, and restores. The control plane's handlers
// (control/vm_handlers.cpp, control/restore_point_handlers.cpp) are thin JSON
// translations of these calls; the NBD server reaches disk restore points
// through exports() (names "{collection}/{restorePoint}/{disk}").
//
// Model (Azure's Microsoft.Compute restore points, on one host):
//   VM            a name, an ordered list of managed disks (each disk in at most
//                 one VM) and an opaque configuration that restore points keep.
//   Collection    one per VM, in a region (a store::Store at a configured path).
//   RestorePoint  crash-consistent across the VM's disks not excluded; one
//                 DiskRestorePoint (a store point) per disk. The first point of
//                 a disk in a collection is full, later ones incremental against
//                 the disk's change tracker; a disk grown or added in between is
//                 handled (added: full; grown: new slots start as holes).
//   Operation     an async job (create point, restore disk, restore VM, verify)
//                 with status InProgress | Succeeded | Failed and percentComplete.
//
// Durability: every record is in the metadata database (SQLite, FULL sync)
// before the call that made it returns. A restore point is marked Succeeded
// only after every disk point is committed in the region's store. On Open,
// points and operations left Creating/InProgress by a crash become Failed
// (their store writers never committed; trackers kept their generations, so the
// next point still sees every change).
//
// Thread-safety: every method is safe from any thread. Jobs run on the
// service's own threads; nothing here runs on, or blocks, a reactor.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/block_device.h"
#include "restore/peer_link.h"

namespace rpoint {

class DiskService;

struct RegionSpec {
  std::string name;  // [A-Za-z0-9._-]{1,63}
  std::string path;  // the store directory (created if missing); empty for a peer region
  bool is_default = false;
  // A region kept by another rpointd host (restore/peer_link.h): its peers
  // API address ("host:port") and the region's name there.
  std::string peer = {};
  std::string peer_region = {};
};

// A shell command run around a FileSystemConsistent cut. Environment:
// RPOINT_VM, RPOINT_COLLECTION, RPOINT_RESTORE_POINT, RPOINT_PHASE (freeze|thaw).
struct FreezeHooks {
  std::string freeze;  // /bin/sh -c; non-zero exit or timeout fails the point
  std::string thaw;    // always run after a freeze was attempted
};

struct RestoreServiceOptions {
  std::vector<RegionSpec> regions;  // at least one; exactly one is_default
  std::string metadata_db;          // the daemon's SQLite file (DiskService's)
  // <state>/tracking: per-disk bitmaps live in <tracking_dir>/<disk>. The
  // trackers belong to DiskService: pass the same directory as
  // DiskServiceOptions::tracking_dir (this field is informational).
  std::string tracking_dir;
  std::string staging_dir;  // <state>/staging: copy-before-write staging files
  // Hooks: per VM name; `default_hooks` for VMs not listed (empty = none).
  std::map<std::string, FreezeHooks> vm_hooks;
  FreezeHooks default_hooks;
  unsigned hook_timeout_seconds = 60;
  unsigned copy_threads = 2;  // readers+hashers per restore point job
  // Ended operations are kept this long, and at most this many (the oldest
  // ended ones go first); an InProgress operation is never pruned.
  unsigned operation_retention_seconds = 86400;
  unsigned operation_max_count = 10000;
  // Pack files kept open, all regions together (store.open_packs).
  size_t open_packs = 128;
  // Peer regions: tls.dir (ca-cert.pem, client-cert.pem, client-key.pem) for
  // the HTTPS calls and the NBD reads, and how long a copy to or from a peer
  // keeps retrying without progress (a cut link, a peer restarting) before
  // it ends Failed.
  std::string peer_tls_dir;
  unsigned peer_deadline_seconds = 120;
};

// ---- records (what GET returns; handlers turn them into Azure-shaped JSON) ----

struct VmRecord {
  std::string name;
  std::vector<std::string> disks;  // disk names, in the order given
  nlohmann::json configuration;    // opaque, as PUT
  std::string time_created;        // RFC 3339 UTC
};

struct CollectionRecord {
  std::string name;
  std::string source_vm;  // source.id = "/vms/" + source_vm
  std::string region;     // location
  std::string time_created;
  std::string provisioning_state = "Succeeded";
};

struct DiskRestorePointRecord {
  std::string disk;  // source disk name; also this disk restore point's name
  uint64_t size_bytes = 0;
  uint32_t granularity = 0;
  bool full = false;   // stored every allocated block, not a delta
  std::string status;  // replicationStatus.status: Pending | InProgress | Succeeded | Failed
  int completion_percent = 0;   // replicationStatus.completionPercent
  uint64_t blocks_to_copy = 0;  // chunk slots the point had to store
  uint64_t blocks_copied = 0;
  uint64_t bytes_stored = 0;  // new chunk bytes written to the store (after dedup)
  uint64_t store_point = 0;   // store::PointId once committed, else 0
  uint64_t parent_store_point = 0;
};

struct RestorePointRecord {
  std::string collection;
  std::string name;
  std::string consistency_mode;  // CrashConsistent | FileSystemConsistent
  std::vector<std::string> exclude_disks;
  std::string provisioning_state;  // Creating | Succeeded | Failed | Deleting
  std::string time_created;        // the cut's time
  // Already in the contract's shape: {"vmId":"/vms/vm","vmName","configuration",
  // "storageProfile":{"disks":[{"name","id":"/disks/a","sizeBytes","kind",
  // "diskRestorePoint":{"id"}}]}} (excluded disks absent; sizes as at the cut).
  nlohmann::json source_metadata;
  std::vector<DiskRestorePointRecord> disk_restore_points;
  std::string operation_id;               // the creating operation
  int64_t cut_pause_ns = -1;              // guest I/O pause of the cut (-1 before the cut)
  std::string error_code, error_message;  // Failed only
  // A copy: the point it copies, "/restorePointCollections/c/restorePoints/rp"
  // (empty for a point cut from the VM).
  std::string source_restore_point;
};

struct OperationRecord {
  std::string id;    // uuid-like, [0-9a-f-]
  std::string kind;  // CreateRestorePoint | RestoreDisk | RestoreVm | Verify
  std::string
      resource_id;     // the resource it acts on, e.g. /restorePointCollections/c/restorePoints/rp
  std::string status;  // InProgress | Succeeded | Failed
  int percent_complete = 0;
  std::string start_time, end_time;  // RFC 3339; end_time empty while InProgress
  std::string error_code, error_message;
  nlohmann::json result;  // kind-specific (Verify: the report), null otherwise
};

struct VerifyDamage {
  std::string disk;
  std::string kind;                       // Chunk | Page | Pack
  std::string digest;                     // hex, empty for packs
  uint64_t first_offset = 0, length = 0;  // disk byte range affected
  std::string reason;
};

// What a create call returns: the record as it is now and the operation to poll.
template <typename T>
struct Started {
  T record;
  std::string operation_id;
  bool created = true;  // false: an identical repeat of an earlier request (HTTP 200, no new job)
};

class RestoreService {
 public:
  static Result<std::unique_ptr<RestoreService>> Open(const RestoreServiceOptions& options,
                                                      DiskService& disks);
  virtual ~RestoreService() = default;

  // ---- VMs ----
  // Create or replace. InvalidArgument: bad name, unknown disk, duplicate;
  // Conflict: a disk already in another VM. Returns {record, created}.
  virtual Result<std::pair<VmRecord, bool>> put_vm(const std::string& name,
                                                   const std::vector<std::string>& disks,
                                                   const nlohmann::json& configuration) = 0;
  virtual Result<VmRecord> get_vm(const std::string& name) = 0;
  virtual std::vector<VmRecord> list_vms() = 0;
  // Collections and their points stay (a restore point outlives its VM).
  virtual Status delete_vm(const std::string& name) = 0;
  // The VM a disk belongs to, if any (disk deletion refuses disks in a VM).
  virtual std::optional<std::string> vm_of_disk(const std::string& disk) = 0;

  // ---- regions ----
  virtual std::vector<RegionSpec> regions() = 0;
  // Ok when the region can be used; Unavailable (with the reason and what to
  // do) when its store was missing at start while metadata.db records
  // restore points in it, or its directory was removed while rpointd ran;
  // NotFound for a region that is not configured. Peer regions are Ok.
  virtual Status region_status(const std::string& region) = 0;

  // ---- collections ----
  // region empty = the default region. A VM may have several collections.
  virtual Result<std::pair<CollectionRecord, bool>> put_collection(const std::string& name,
                                                                   const std::string& source_vm,
                                                                   const std::string& region) = 0;
  virtual Result<CollectionRecord> get_collection(const std::string& name) = 0;
  virtual std::vector<CollectionRecord> list_collections() = 0;
  // Deletes its restore points too. Conflict while one is Creating.
  virtual Status delete_collection(const std::string& name) = 0;

  // ---- restore points ----
  // Validates synchronously (InvalidArgument names the shared/ephemeral disk
  // not excluded, an excluded disk not in the VM, a FileSystemConsistent point
  // with no freeze hook; Conflict when the VM has a point Creating), records
  // the point Creating and starts the job.
  virtual Result<Started<RestorePointRecord>> create_restore_point(
      const std::string& collection, const std::string& name,
      const std::vector<std::string>& exclude_disks, const std::string& consistency_mode) = 0;
  virtual Result<RestorePointRecord> get_restore_point(const std::string& collection,
                                                       const std::string& name) = 0;
  virtual Result<std::vector<RestorePointRecord>> list_restore_points(
      const std::string& collection) = 0;
  // Copies point `source_name` of `source_collection` (same VM, another
  // region) into `collection` as `name`: the point is Creating while its
  // chunks move (only those the target region lacks), Succeeded once all are
  // there. InvalidArgument: same region; Conflict: another VM's collection,
  // the source not Succeeded, the name taken; NotFound: no such source.
  // The operation's result: {"bytesMoved", "chunksMoved", "chunksReused"}.
  virtual Result<Started<RestorePointRecord>> copy_restore_point(
      const std::string& collection, const std::string& name,
      const std::string& source_collection, const std::string& source_name) = 0;
  // Any point, in any order; Conflict while Creating. Space returns at the
  // store's next GC (started in the background). Open NBD devices of the
  // point are retired (clients are disconnected at their next request).
  virtual Status delete_restore_point(const std::string& collection, const std::string& name) = 0;
  // Long-running: re-reads and re-hashes everything the point references.
  // The operation's result: {"ok": bool, "chunksChecked", "bytesRead",
  // "damage": [{"disk","kind","digest","offset","length","reason"}]}.
  // Conflict unless the point is Succeeded. Damage found is not a failure:
  // the operation Succeeds with "ok": false.
  virtual Result<std::string> start_verify(const std::string& collection,
                                           const std::string& name) = 0;

  // ---- restore ----
  // New managed disk `disk` from the disk restore point `source_id`
  // ("/restorePointCollections/c/restorePoints/rp/diskRestorePoints/d").
  // The disk record exists at once (provisioning Creating, not exported) and
  // is served once the operation succeeds; a failed restore deletes it.
  // InvalidArgument: malformed source_id or disk name; NotFound: no such disk
  // restore point; Conflict: the point is not Succeeded; AlreadyExists: the
  // disk name is taken. The new disk has the point's size and granularity.
  virtual Result<std::string> start_restore_disk(const std::string& disk,
                                                 const std::string& source_id) = 0;
  // New VM `vm` from a restore point: one disk per disk restore point, named
  // `{vm}-{sourceDisk}` unless `disk_names` maps a source disk to a name, and
  // the stored configuration. Conflict: the VM or a disk name exists, or the
  // point is not Succeeded; InvalidArgument: disk_names names an unknown disk.
  virtual Result<std::string> start_restore_vm(
      const std::string& collection, const std::string& name, const std::string& vm,
      const std::map<std::string, std::string>& disk_names) = 0;

  // ---- operations ----
  virtual Result<OperationRecord> get_operation(const std::string& id) = 0;
  // Every operation still retained (see RestoreServiceOptions), newest first.
  virtual Result<std::vector<OperationRecord>> list_operations() = 0;

  // ---- region maintenance (operator actions) ----
  // Brings the region's index in line with its files (store::Store::repair:
  // re-index packs, import point files) and imports the restore points its
  // manifests hold that metadata.db does not know. Never deletes anything.
  // Result: {"region", "packs", "packsIndexed", "objectsIndexed",
  // "storePointsImported", "pointFilesWritten", "storePointsIncomplete",
  // "packsUnreadable": [{"pack","reason"}], "packsMissing",
  // "restorePointsImported": [ids]}. NotFound: no such region; Conflict: a
  // point is being written there.
  virtual Result<nlohmann::json> repair_region(const std::string& region) = 0;
  // A GC pass of the region now. With `orphans`, first deletes every store
  // point no restore point (or retained base) names, and afterwards pack
  // files the index cannot use: data only an explicit request may delete.
  // Result: {"region", "orphans", "storePointsDeleted", "objectsDeleted",
  // "packsDeleted", "packsRepacked", "unindexedPacksDeleted",
  // "packBytesBefore", "packBytesAfter", "unindexedBytesFreed"}.
  // Conflict while a restore point of the region is being created.
  virtual Result<nlohmann::json> gc_region(const std::string& region, bool orphans) = 0;

  // ---- regions on other hosts (restore/peer_link.h, docs/api.md "Peer API") ----
  // How copies to a peer region share their source points (the daemon's
  // AccessGrants). Set once before serving; copies to peer regions fail
  // (Unsupported) without it.
  virtual void set_point_sharer(PointSharer* sharer) = 0;
  // The keeping host's side. A collection another host keeps in `region`
  // here: as put_collection, but the VM lives on the other host.
  virtual Result<std::pair<CollectionRecord, bool>> put_peer_collection(
      const std::string& name, const std::string& source_vm, const std::string& region) = 0;
  // Receives a point into a collection kept here: Creating at once (its
  // operation ReceiveRestorePoint), then the chunks this region lacks are
  // read from the sender's NBD exports, re-hashed, stored, and the point
  // committed with its manifest. A repeat for the same source answers the
  // same point (created = false).
  virtual Result<Started<RestorePointRecord>> receive_restore_point(const std::string& collection,
                                                                    const std::string& name,
                                                                    const PeerPull& pull) = 0;
  virtual Result<PeerPointState> peer_point_state(const std::string& collection,
                                                  const std::string& name) = 0;
  // The sender ends a copy it posted (PeerAbort): the receive stops within
  // seconds and what it stored goes. The point's state after it (Failed with
  // the abort's error), or nullopt when the abort deleted it. NotFound: no
  // such point; Conflict: a point of another source, or one already Succeeded.
  virtual Result<std::optional<PeerPointState>> abort_peer_receive(const std::string& collection,
                                                                   const std::string& name,
                                                                   const PeerAbort& abort) = 0;

  // ---- NBD ----
  // Read-only exports of every Succeeded disk restore point.
  virtual ExportResolver& exports() = 0;

  // Stops jobs (their points become Failed) and joins threads. Idempotent.
  // A job inside a freeze/thaw hook finishes the hook first (at most
  // hook_timeout_seconds). Call before destroying the DiskService.
  virtual void shutdown() = 0;
};

}  // namespace rpoint
