// RestoreServiceImpl: the one implementation of RestoreService, shared by the
// files that define its parts (restore_service.cpp: open, recovery, VMs,
// collections, records; point_job.cpp: creating restore points;
// restore_jobs.cpp: verify and restores; point_exports.cpp: NBD exports).
// Private to restore/.
//
// Thread-safety: every public method is safe from any thread. mu_ guards the
// database connection and the in-memory job state; jobs run on threads the
// service starts (spawn) and joins (shutdown). Lock order: mu_ -> DiskService's.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "restore/restore_db.h"
#include "restore/restore_service.h"
#include "store/point_device.h"
#include "store/store.h"

namespace rpoint {

class FileDisk;

class FileDisk;
class DiskSnapshot;

Status ValidateResourceName(const std::string& what, const std::string& name);
std::string NewOperationId();
std::string PointId(const std::string& c, const std::string& rp);
std::string DiskPointId(const std::string& c, const std::string& rp, const std::string& d);
std::vector<std::string> Split(const std::string& s, char sep);

// Opens the store point a disk restore point's record names, and checks it is
// that point's: the tag it was written with (DiskPointId of its collection,
// point and disk) must be `disk_point_id`. A record naming another point (a
// flipped bit in metadata.db, a damaged manifest) would otherwise serve,
// restore or copy another point's bytes as this one's: IoError instead.
// Points written without a tag are taken as they are.
Result<std::shared_ptr<store::PointReader>> OpenDiskPoint(store::Store& st, uint64_t store_point,
                                                          const std::string& disk_point_id);

// Live progress of a job, so GETs see it without a database write per block.
struct PointProgress {
  explicit PointProgress(size_t disks) : to_copy(disks), copied(disks) {}
  std::vector<std::atomic<uint64_t>> to_copy;
  std::vector<std::atomic<uint64_t>> copied;
  std::vector<std::atomic<bool>> started = std::vector<std::atomic<bool>>(to_copy.size());
  // A delete of the point (or its collection) asks its job to stop: a copy
  // (local, or to a peer, which it tells) ends Failed (Canceled). Set it with
  // RestoreServiceImpl::cancel_copy_locked, which also wakes the job's naps.
  std::atomic<bool> cancel{false};
};

// A job failure: the Azure-style error code shown to clients and a message.
struct JobError {
  std::string code;
  std::string message;
};

// Ends an operation record: Failed with err's code and message, or Succeeded at 100%.
inline void EndOperation(OperationRecord& op, const JobError* err, const std::string& now) {
  op.end_time = now;
  if (err) {
    op.status = "Failed";
    op.error_code = err->code;
    op.error_message = err->message;
  } else {
    op.status = "Succeeded";
    op.percent_complete = 100;
  }
}

class RestoreServiceImpl final : public RestoreService, public ExportResolver {
 public:
  RestoreServiceImpl(RestoreServiceOptions options, DiskService& disks,
                     std::unique_ptr<RestoreDb> db)
      : options_(std::move(options)), disks_(disks), db_(std::move(db)) {}
  ~RestoreServiceImpl() override { shutdown(); }

  Status init();

  // ---- VMs ----
  Result<std::pair<VmRecord, bool>> put_vm(const std::string& name,
                                           const std::vector<std::string>& disks,
                                           const nlohmann::json& configuration) override;
  Result<VmRecord> get_vm(const std::string& name) override;
  std::vector<VmRecord> list_vms() override;
  Status delete_vm(const std::string& name) override;
  std::optional<std::string> vm_of_disk(const std::string& disk) override;
  std::vector<RegionSpec> regions() override { return regions_; }
  Status region_status(const std::string& region) override;

  // ---- collections ----
  Result<std::pair<CollectionRecord, bool>> put_collection(const std::string& name,
                                                           const std::string& source_vm,
                                                           const std::string& region) override;
  Result<CollectionRecord> get_collection(const std::string& name) override;
  std::vector<CollectionRecord> list_collections() override;
  Status delete_collection(const std::string& name) override;

  // ---- restore points ----
  Result<Started<RestorePointRecord>> create_restore_point(
      const std::string& collection, const std::string& name,
      const std::vector<std::string>& exclude_disks, const std::string& consistency_mode) override;
  Result<RestorePointRecord> get_restore_point(const std::string& collection,
                                               const std::string& name) override;
  Result<std::vector<RestorePointRecord>> list_restore_points(
      const std::string& collection) override;
  Result<Started<RestorePointRecord>> copy_restore_point(const std::string& collection,
                                                         const std::string& name,
                                                         const std::string& source_collection,
                                                         const std::string& source_name) override;
  Status delete_restore_point(const std::string& collection, const std::string& name) override;
  Result<std::string> start_verify(const std::string& collection, const std::string& name) override;

  // ---- restore ----
  Result<std::string> start_restore_disk(const std::string& disk,
                                         const std::string& source_id) override;
  Result<std::string> start_restore_vm(
      const std::string& collection, const std::string& name, const std::string& vm,
      const std::map<std::string, std::string>& disk_names) override;

  Result<OperationRecord> get_operation(const std::string& id) override;
  Result<std::vector<OperationRecord>> list_operations() override;

  // ---- region maintenance ----
  Result<nlohmann::json> repair_region(const std::string& region) override;
  Result<nlohmann::json> gc_region(const std::string& region, bool orphans) override;
  // Also starts the copies to peers recover() kept Creating (they need it).
  void set_point_sharer(PointSharer* sharer) override;
  Result<std::pair<CollectionRecord, bool>> put_peer_collection(const std::string& name,
                                                                const std::string& source_vm,
                                                                const std::string& region) override;
  Result<Started<RestorePointRecord>> receive_restore_point(const std::string& collection,
                                                            const std::string& name,
                                                            const PeerPull& pull) override;
  Result<PeerPointState> peer_point_state(const std::string& collection,
                                          const std::string& name) override;
  Result<std::optional<PeerPointState>> abort_peer_receive(const std::string& collection,
                                                           const std::string& name,
                                                           const PeerAbort& abort) override;
  ExportResolver& exports() override { return *this; }
  void shutdown() override;

  // ---- ExportResolver ----
  std::shared_ptr<BlockDevice> find_export(const std::string& name) override;
  std::vector<ExportInfo> list_exports() override;
  std::vector<std::string> meta_contexts(const std::string& export_name) override;
  std::shared_ptr<MetaContext> open_meta_context(const std::string& export_name,
                                                 const std::string& name) override;

 private:
  struct DiskPointRef {
    std::string region;
    uint64_t store_point = 0;
    uint32_t granularity = 0;
  };
  // The committed store point of disk `disk` in Succeeded point
  // collection/point (mu_ held), or nothing.
  std::optional<DiskPointRef> disk_point_locked(const std::string& collection,
                                                const std::string& point, const std::string& disk);

  struct Job {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };

  void spawn(std::function<void()> fn);
  // Fills an InProgress operation's live progress (mu_ held).
  void overlay_live_locked(OperationRecord& op);
  // Drops ended operations past the retention window or count (mu_ held).
  void prune_operations_locked();
  // The region's store; null when it is not configured here, is on a peer or
  // is unavailable (region_status says why).
  std::shared_ptr<store::Store> store_of(const std::string& region);
  // Status::Unavailable or NotFound naming why store_of(region) is null, for
  // the error of whatever needed the store.
  Status no_store(const std::string& region);
  // Restore points of collections in `region` that name a store point. Takes mu_.
  Result<size_t> points_in_region(const std::string& region);
  // Writes the region's own record of a point (restore/manifest.h) after
  // every store commit and before the transaction that makes it Succeeded;
  // the error to fail the job with, if any. Takes mu_.
  std::optional<JobError> write_manifest(store::Store& st, const RestorePointRecord& rec);
  // collection name -> its region, from the metadata (mu_ held).
  Result<std::map<std::string, std::string>> collection_regions_locked();
  FreezeHooks hooks_for(const std::string& vm) const;
  void overlay(RestorePointRecord& p);
  // mu_ held. save_point, tried again after a short wait when it fails (a
  // transient I/O error of the database must not strand a finished job).
  Status save_point_retrying_locked(const RestorePointRecord& rec, const OperationRecord* op,
                                    const std::vector<TrackingBase>* bases);
  // mu_ held. Saves what unrecorded_ holds; keeps what still fails.
  void record_unrecorded_locked();
  OperationRecord new_operation(const std::string& kind, const std::string& resource_id);
  void finish_operation(OperationRecord& op, const JobError* err, nlohmann::json result = nullptr);
  Status recover();
  // mu_ held. Imports the region's manifests of points metadata.db does not
  // know (collections created as needed, named in *imported_collections).
  // Returns the imported points' ids.
  Result<std::vector<std::string>> import_manifests_locked(
      const std::string& region, std::set<std::string>* imported_collections);
  // mu_ held. The region's store points no restore point or retained base
  // names, each with whether it is provably a leftover of this daemon's own
  // (its tag names a point of a collection known here, not in `imported`,
  // that failed or is gone from metadata.db and the region's manifests).
  Result<std::vector<std::pair<store::PointInfo, bool>>> unnamed_store_points_locked(
      const std::string& region, const std::set<std::string>& imported);
  void request_gc(const std::string& region);
  // Removes a point's store points (except those kept as retained tracking
  // bases) and rows (it is Deleting or Failed).
  void purge_point(const RestorePointRecord& p, const std::string& region);

  // A store point in a region, to delete once no record names it.
  struct StoreRef {
    std::string region;
    uint64_t id = 0;
  };
  // mu_ held. Forgets retained bases that can never be a parent again: their
  // collection, its VM or the disk is gone, or the disk left the VM. Returns
  // their store points for free_store_points (after mu_ is released).
  std::vector<StoreRef> sweep_retained_locked();
  // The point `name` of `collection` and the collection's region; NotFound
  // names whichever is missing. Caller holds mu_.
  struct FoundPoint {
    std::string region;
    RestorePointRecord point;
  };
  Result<FoundPoint> find_point_locked(const std::string& collection, const std::string& name);
  // The collection a new point (cut or copy) goes into: NotFound, or Conflict
  // when it is being deleted or its region is no longer configured. Caller
  // holds mu_.
  Result<CollectionRecord> collection_for_new_point_locked(const std::string& collection);
  // Deletes the store points, then a GC pass of each region. A crash before
  // the delete leaves them unnamed: Open deletes them.
  // Retires `disk`'s tracker through the oldest generation any collection's
  // base of it still needs (at most `limit`). Callers hold mu_.
  void retire_needed_locked(FileDisk& disk, uint64_t limit = UINT64_MAX);
  void free_store_points(const std::vector<StoreRef>& refs);

  // Jobs.
  void run_create_point(RestorePointRecord rec, OperationRecord op, std::string vm,
                        std::string region, std::shared_ptr<PointProgress> prog);
  // Cuts and copies; on success fills *to_retire with each disk's frozen
  // generation (retired once the point is recorded Succeeded).
  std::optional<JobError> create_point(
      RestorePointRecord& rec, const std::string& vm, const std::string& region,
      PointProgress& prog, std::vector<std::pair<std::shared_ptr<FileDisk>, uint64_t>>* to_retire);
  Result<store::PointInfo> copy_disk(store::PointWriter& w, DiskSnapshot& snap,
                                     std::atomic<uint64_t>& to_copy, std::atomic<uint64_t>& copied);
  // Fills an existing (Creating) disk's file from a store point.
  Status fill_disk(const std::string& disk, store::Store& st, uint64_t store_point,
                   const std::string& disk_point_id,
                   const std::function<void(uint64_t, uint64_t)>& progress);
  void run_verify(RestorePointRecord rec, OperationRecord op, std::string region);
  // The copy job (restore/copy_job.cpp): `src` in `src_region` into `rec`.
  void run_copy_point(RestorePointRecord rec, OperationRecord op, RestorePointRecord src,
                      std::string src_region, std::string region,
                      std::shared_ptr<PointProgress> prog);
  // recover(): whether the interrupted copy `p` can go on, else why not.
  // Caller holds mu_.
  std::optional<std::string> copy_resume_blocker_locked(const RestorePointRecord& p);
  // Open: starts the copies recover() kept Creating.
  void resume_copies();
  // rpoint:changed: on live disk exports (restore/point_exports.cpp): the
  // tracking base of (disk, collection) when it is `point` and the tracker
  // still holds every change since it. Caller holds mu_.
  std::optional<TrackingBase> live_changed_base_locked(const std::string& disk,
                                                       const std::string& collection,
                                                       const std::string& point,
                                                       const FileDisk& fd);
  std::vector<std::string> live_meta_contexts(const std::string& disk);

  // restore/peer_jobs.cpp: regions on other hosts.
  const RegionSpec* peer_region(const std::string& region) const;
  // Conflict for a point of a region kept by a peer: its data is there;
  // no_store's error when the region's store is unavailable or unknown.
  Status kept_here(const std::string& region, const std::string& collection,
                   const std::string& name);
  Result<std::pair<CollectionRecord, bool>> insert_collection(const std::string& name,
                                                              const std::string& source_vm,
                                                              const std::string& region,
                                                              bool vm_here);
  // The base of a copy of `src` into far collection `collection`: the newest
  // Succeeded far point there whose source (not `src` itself) is still a
  // Succeeded point of `src_region` on this host. Caller holds mu_.
  struct PeerSendBase {
    std::string far_point;      // its name in the far collection (and on the peer)
    RestorePointRecord source;  // the point of this host it is a copy of
    RestorePointRecord far;     // this host's record of the far point
  };
  std::optional<PeerSendBase> peer_send_base_locked(const std::string& collection,
                                                    const RestorePointRecord& src,
                                                    const std::string& src_region);
  void run_send_point(RestorePointRecord rec, OperationRecord op, RestorePointRecord src,
                      std::string src_region, std::string region,
                      std::shared_ptr<PointProgress> prog);
  // The store points of the pull's base that its changed disks start from
  // (0 for a disk with a full list); NotFound when this host lacks them.
  // Caller holds mu_.
  Result<std::vector<store::PointId>> peer_base_disks_locked(const std::string& collection,
                                                             const PeerPull& pull);
  // A point being received: bytes moved per disk, and each disk's grant uri
  // (a post of the same copy again, from a sender that restarted, replaces
  // them; the job's next NBD connection uses the new one).
  struct PeerReceive {
    explicit PeerReceive(const PeerPull& pull) : moved(pull.disks.size()) {
      for (const auto& d : pull.disks) uris.push_back(d.uri);
    }
    std::vector<std::atomic<uint64_t>> moved;
    std::mutex mu;
    std::vector<std::string> uris;  // guarded by mu
    // Set (under mu, then the flag) to stop the job: it ends Failed with
    // `abort_error`, its store points deleted (abort_receive_locked).
    std::atomic<bool> aborted{false};
    JobError abort_error;  // guarded by mu
  };
  // Asks the running receive of "c/rp" to stop and fail with `why`; false
  // when none runs. Caller holds mu_.
  bool abort_receive_locked(const std::string& key, const JobError& why);
  // Waits (releasing `lock`, a lock of mu_) up to `limit` for the job of
  // "c/rp" to end: true once it left live_points_ (end_job_locked wakes it).
  bool wait_job_end_locked(std::unique_lock<std::mutex>& lock, const std::string& key,
                           std::chrono::milliseconds limit);
  // A job's end: drops "c/rp" from live_points_ and receiving_ and wakes
  // wait_job_end_locked. Caller holds mu_.
  void end_job_locked(const std::string& key);
  // Sleeps up to `ms`, but returns as soon as `stop` is true: a job's retry
  // and poll waits. wake_naps() (a cancel, an abort, shutdown) re-checks them.
  void nap(std::chrono::milliseconds ms, const std::function<bool()>& stop);
  void wake_naps();
  // Deleting point c/rp (or its collection) while it is Creating: a copy
  // (local, to or from a peer) is canceled and waited for (up to 30 s); a
  // point being cut is Conflict. Ok once no job runs for it. `lock` holds mu_.
  Status cancel_copy_locked(std::unique_lock<std::mutex>& lock, const std::string& collection,
                            const std::string& name);
  // Conflict naming the running copy whose source is point c/rp of this host
  // (a copy reads its source to the end: it cannot be deleted meanwhile).
  // Caller holds mu_.
  Status refuse_if_copy_source_locked(const std::string& collection, const std::string& name);
  // Tells the peer keeping `region` to abort its receive of c/rp (a copy
  // this host ended): transport failures are retried for up to `budget`.
  // NotFound (nothing there to abort) counts as done.
  Status tell_peer_abort(const std::string& region, const std::string& collection,
                         const std::string& name, const PeerAbort& abort,
                         std::chrono::seconds budget);
  // Starts receiving `pull` into `rec` (Creating, saved): the live maps, the job.
  // `gc_held`: the job releases a GC hold on `region` once its references
  // protect what an interrupted run checkpointed. Caller holds mu_.
  void start_receive_locked(const RestorePointRecord& rec, const OperationRecord& op,
                            const PeerPull& pull, const std::string& region, bool gc_held);
  void run_receive_point(RestorePointRecord rec, OperationRecord op, PeerPull pull,
                         std::string region, std::shared_ptr<PointProgress> prog,
                         std::shared_ptr<PeerReceive> rx, bool gc_held);
  // The pull of a point being received, kept (atomically, fsynced) for as
  // long as it is Creating so that a restart resumes it: <staging>/peer-pulls/c/rp.
  std::string pull_path(const std::string& collection, const std::string& name) const;
  Status save_pull(const std::string& collection, const std::string& name, const PeerPull& pull);
  Result<PeerPull> load_pull(const std::string& collection, const std::string& name) const;
  void remove_pull(const std::string& collection, const std::string& name);
  // GC of `region` waits while held (a resumed receive has not yet named the
  // chunks its interrupted run checkpointed); the last release runs it if asked.
  void hold_gc(const std::string& region);
  void release_gc(const std::string& region);
  // Ends a copy job (local or received): on error deletes its store points in
  // `st` and marks it Failed; records the point and its operation. summary:
  // what the success log line says was moved (empty: the result as JSON).
  void finish_copy(RestorePointRecord& rec, OperationRecord& op, std::optional<JobError> err,
                   store::Store* st, nlohmann::json result, const std::string& summary = "");

  const RestoreServiceOptions options_;
  DiskService& disks_;
  std::string default_region_;
  std::vector<RegionSpec> regions_;  // as configured, is_default normalised
  std::map<std::string, std::shared_ptr<store::Store>> stores_;
  // Regions left unopened at start, and why: their store was missing while
  // metadata.db records points in them (an unmounted filesystem, a removed
  // directory), or it failed to open (damaged store.db, EIO, LOCK held by
  // another daemon). Written by init() only.
  std::map<std::string, std::string> missing_stores_;
  // Regions whose directory went away while running, logged once (lost_mu_).
  std::mutex lost_mu_;
  std::set<std::string> lost_logged_;

  std::mutex mu_;  // db_, the maps below
  std::unique_ptr<RestoreDb> db_;
  std::map<std::string, std::shared_ptr<PointProgress>> live_points_;  // "c/rp"
  std::condition_variable job_ended_;  // with mu_: an entry left live_points_
  std::map<std::string, std::shared_ptr<std::atomic<int>>> live_ops_;
  // Ends of point jobs the metadata database refused to record (its commit
  // failed, retries too): served from here ("c/rp", operation id) so clients
  // see the end, and saved again before the next point job records its own.
  // A restart without them marks the point Failed (still Creating on disk).
  std::map<std::string, std::pair<RestorePointRecord, OperationRecord>> unrecorded_;
  std::set<std::string> creating_vms_;  // VMs with a point job running
  std::set<std::string> deleting_collections_;
  std::map<std::string, std::weak_ptr<store::PointDevice>> devices_;
  std::unique_ptr<PeerLink> peer_link_;  // set when a peer region is configured
  std::atomic<PointSharer*> sharer_{nullptr};
  // Points being received from another host ("c/rp"): progress and grant uris.
  std::map<std::string, std::shared_ptr<PeerReceive>> receiving_;

  std::mutex jobs_mu_;
  std::list<Job> jobs_;
  std::atomic<bool> stopping_{false};
  // nap(): jobs' interruptible waits. wake_mu_ is a leaf (taken with mu_ held).
  std::mutex wake_mu_;
  std::condition_variable wake_;

  std::mutex gc_mu_;
  std::set<std::string> gc_running_, gc_again_;
  std::map<std::string, int> gc_holds_;   // region -> holds (hold_gc)
  std::set<std::string> gc_deferred_;     // asked while held
  std::vector<std::string> gc_at_start_;  // regions recover() freed store points in
  // Copies recover() found interrupted with their source still there: Open
  // starts them again (restore/copy_job.cpp).
  std::vector<RestorePointRecord> copies_to_resume_;
  // Points being received from a peer that recover() kept Creating, with their pulls.
  std::vector<std::pair<RestorePointRecord, PeerPull>> receives_to_resume_;
  // Copies to a peer resumed before the sharer was set (guarded by mu_):
  // set_point_sharer starts them.
  struct PendingSend {
    RestorePointRecord rec;
    OperationRecord op;
    RestorePointRecord src;
    std::string src_region, region;
    std::shared_ptr<PointProgress> prog;
  };
  std::vector<PendingSend> sends_to_resume_;
  // Copies to a peer that recover() ended (their source gone): Open tells
  // each peer to abort its half (guarded by mu_ until then).
  struct PendingAbort {
    std::string region, collection, name;
    PeerAbort abort;
  };
  std::vector<PendingAbort> aborts_to_send_;
};

}  // namespace rpoint
