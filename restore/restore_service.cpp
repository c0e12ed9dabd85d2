// RestoreService implementation: validation, records and the job threads.
// docs/restore-points.md explains how incremental chains are decided and what
// a crash leaves behind.
#include "restore/restore_service.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <list>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "common/unique_fd.h"
#include "control/disk_files.h"
#include "control/disk_service.h"
#include "engine/cut.h"
#include "engine/file_disk.h"
#include "restore/hooks.h"
#include "restore/restore_db.h"
#include "store/point_device.h"
#include "store/point_reader.h"
#include "store/point_writer.h"
#include "store/store.h"

namespace rpoint {

namespace {

constexpr const char* kCollectionsPrefix = "/restorePointCollections/";

Status ValidateResourceName(const std::string& what, const std::string& name) {
  Status s = DiskService::ValidateName(name);
  if (s.ok()) return s;
  std::string m = s.message();
  size_t at = m.find("disk name");
  if (at != std::string::npos) m.replace(at, 9, what + " name");
  return Status::InvalidArgument(m);
}

std::string NewOperationId() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  uint64_t a, b;
  {
    std::lock_guard<std::mutex> lock(mu);
    a = rng();
    b = rng();
  }
  // UUID version 4 layout.
  a = (a & ~0xf000ull) | 0x4000ull;
  b = (b & ~(0xc000ull << 48)) | (0x8000ull << 48);
  char buf[40];
  std::snprintf(buf, sizeof buf, "%08x-%04x-%04x-%04x-%012llx", static_cast<unsigned>(a >> 32),
                static_cast<unsigned>((a >> 16) & 0xffff), static_cast<unsigned>(a & 0xffff),
                static_cast<unsigned>(b >> 48),
                static_cast<unsigned long long>(b & 0xffffffffffffull));
  return buf;
}

std::string PointId(const std::string& c, const std::string& rp) {
  return kCollectionsPrefix + c + "/restorePoints/" + rp;
}

std::string DiskPointId(const std::string& c, const std::string& rp, const std::string& d) {
  return PointId(c, rp) + "/diskRestorePoints/" + d;
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t at = s.find(sep, start);
    out.push_back(s.substr(start, at - start));
    if (at == std::string::npos) break;
    start = at + 1;
  }
  return out;
}

// Live progress of a job, so GETs see it without a database write per block.
struct PointProgress {
  explicit PointProgress(size_t disks) : to_copy(disks), copied(disks) {}
  std::vector<std::atomic<uint64_t>> to_copy;
  std::vector<std::atomic<uint64_t>> copied;
  std::vector<std::atomic<bool>> started = std::vector<std::atomic<bool>>(to_copy.size());
};

// A job failure: a Status plus the Azure-style error code shown to clients.
struct JobError {
  std::string code;
  std::string message;
};

}  // namespace

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
  std::vector<RegionSpec> regions() override { return options_.regions; }

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
  Status delete_restore_point(const std::string& collection, const std::string& name) override;
  Result<std::string> start_verify(const std::string& collection, const std::string& name) override;

  // ---- restore ----
  Result<std::string> start_restore_disk(const std::string& disk,
                                         const std::string& source_id) override;
  Result<std::string> start_restore_vm(
      const std::string& collection, const std::string& name, const std::string& vm,
      const std::map<std::string, std::string>& disk_names) override;

  Result<OperationRecord> get_operation(const std::string& id) override;
  ExportResolver& exports() override { return *this; }
  void shutdown() override;

  // ---- ExportResolver ----
  std::shared_ptr<BlockDevice> find_export(const std::string& name) override;
  std::vector<ExportInfo> list_exports() override;

 private:
  struct Job {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };

  void spawn(std::function<void()> fn);
  std::shared_ptr<store::Store> store_of(const std::string& region);
  FreezeHooks hooks_for(const std::string& vm) const;
  void overlay(RestorePointRecord& p);
  OperationRecord new_operation(const std::string& kind, const std::string& resource_id);
  void finish_operation(OperationRecord& op, const JobError* err, nlohmann::json result = nullptr);
  Status recover();
  void request_gc(const std::string& region);
  // Removes a point's store points and rows (it is Deleting or Failed).
  void purge_point(const RestorePointRecord& p, const std::string& region);

  // Jobs.
  void run_create_point(RestorePointRecord rec, OperationRecord op, std::string vm,
                        std::string region, std::shared_ptr<PointProgress> prog);
  // Cuts and copies; on success fills *to_retire with each disk's frozen
  // generation (retired once the point is recorded Succeeded).
  std::optional<JobError> create_point(
      RestorePointRecord& rec, const std::string& vm, const std::string& region,
      PointProgress& prog, std::vector<std::pair<std::shared_ptr<FileDisk>, uint64_t>>* to_retire);
  Result<store::PointInfo> copy_disk(store::Store& st, DiskSnapshot& snap, uint64_t parent,
                                     const std::string& tag, std::atomic<uint64_t>& to_copy,
                                     std::atomic<uint64_t>& copied);
  // Fills an existing (Creating) disk's file from a store point.
  Status fill_disk(const std::string& disk, store::Store& st, uint64_t store_point,
                   const std::function<void(uint64_t, uint64_t)>& progress);
  void run_verify(RestorePointRecord rec, OperationRecord op, std::string region);

  const RestoreServiceOptions options_;
  DiskService& disks_;
  std::string default_region_;
  std::map<std::string, std::shared_ptr<store::Store>> stores_;

  std::mutex mu_;  // db_, the maps below
  std::unique_ptr<RestoreDb> db_;
  std::map<std::string, std::shared_ptr<PointProgress>> live_points_;  // "c/rp"
  std::map<std::string, std::shared_ptr<std::atomic<int>>> live_ops_;
  std::set<std::string> creating_vms_;  // VMs with a point job running
  std::set<std::string> deleting_collections_;
  std::map<std::string, std::weak_ptr<store::PointDevice>> devices_;

  std::mutex jobs_mu_;
  std::list<Job> jobs_;
  std::atomic<bool> stopping_{false};

  std::mutex gc_mu_;
  std::set<std::string> gc_running_, gc_again_;
};

// ---------------------------------------------------------------------------
// Open, recovery, jobs

Result<std::unique_ptr<RestoreService>> RestoreService::Open(const RestoreServiceOptions& options,
                                                             DiskService& disks) {
  if (options.metadata_db.empty()) return Status::InvalidArgument("metadata_db is not set");
  if (options.regions.empty()) return Status::InvalidArgument("no regions configured");
  if (options.staging_dir.empty()) return Status::InvalidArgument("staging_dir is not set");
  auto db = RestoreDb::Open(options.metadata_db);
  if (!db.ok()) return db.status();
  auto svc = std::make_unique<RestoreServiceImpl>(options, disks, std::move(db).value());
  Status s = svc->init();
  if (!s.ok()) return s;
  return std::unique_ptr<RestoreService>(std::move(svc));
}

Status RestoreServiceImpl::init() {
  int defaults = 0;
  std::set<std::string> names;
  for (const auto& r : options_.regions) {
    Status s = ValidateResourceName("region", r.name);
    if (!s.ok()) return s;
    if (!names.insert(r.name).second) {
      return Status::InvalidArgument("region '" + r.name + "' is configured twice");
    }
    if (r.path.empty()) return Status::InvalidArgument("region '" + r.name + "' has no path");
    if (r.is_default) {
      ++defaults;
      default_region_ = r.name;
    }
  }
  if (defaults > 1) return Status::InvalidArgument("more than one region is the default");
  if (defaults == 0) {
    if (options_.regions.size() > 1) {
      return Status::InvalidArgument("several regions and none is the default");
    }
    default_region_ = options_.regions[0].name;
  }
  for (const auto& r : options_.regions) {
    Status made = MakeDirectories(r.path, 0750);
    if (!made.ok()) return made;
    store::StoreOptions so;
    so.dir = r.path;
    auto st = store::Store::Open(so);
    if (!st.ok()) {
      return Status(st.status().code(),
                    "region '" + r.name + "' at " + r.path + ": " + st.status().message());
    }
    stores_[r.name] = std::move(st).value();
  }
  Status s = MakeDirectories(options_.staging_dir, 0750);
  if (!s.ok()) return s;
  return recover();
}

Status RestoreServiceImpl::recover() {
  // Staging files: every snapshot they served died with the process.
  if (DIR* dir = ::opendir(options_.staging_dir.c_str())) {
    std::vector<std::string> stale;
    while (struct dirent* de = ::readdir(dir)) {
      std::string f = de->d_name;
      if (f.size() > 8 && f.compare(f.size() - 8, 8, ".staging") == 0) stale.push_back(f);
    }
    ::closedir(dir);
    for (const auto& f : stale) (void)RemoveFile(options_.staging_dir + "/" + f);
  }
  // Disks a restore was filling: never served, never complete.
  for (const DiskRecord& d : disks_.list()) {
    if (d.provisioning_state != "Creating") continue;
    spdlog::warn("restore: removing disk {}: its restore was interrupted by a restart", d.name);
    Status s = disks_.remove(d.name, true);
    if (!s.ok()) spdlog::error("restore: cannot remove disk {}: {}", d.name, s.ToString());
  }
  std::lock_guard<std::mutex> lock(mu_);
  std::string now = NowRfc3339();
  auto points = db_->list_points("");
  if (!points.ok()) return points.status();
  std::map<std::string, std::string> region_of;
  auto colls = db_->list_collections();
  if (!colls.ok()) return colls.status();
  for (const auto& c : colls.value()) region_of[c.name] = c.region;
  for (auto& p : points.value()) {
    if (p.provisioning_state == "Creating") {
      spdlog::warn("restore point {}/{}: daemon restarted during creation; marked Failed",
                   p.collection, p.name);
      // Disk points a writer committed before the crash are not part of any
      // Succeeded point: give their space back.
      auto st = store_of(region_of[p.collection]);
      for (auto& d : p.disk_restore_points) {
        if (d.store_point && st) (void)st->delete_point(d.store_point);
        d.store_point = 0;
        if (d.status != "Succeeded") d.status = "Failed";
      }
      p.provisioning_state = "Failed";
      p.error_code = "Interrupted";
      p.error_message = "daemon restarted during creation";
      Status s = db_->save_point(p);
      if (!s.ok()) return s;
    } else if (p.provisioning_state == "Deleting") {
      auto st = store_of(region_of[p.collection]);
      for (auto& d : p.disk_restore_points) {
        if (d.store_point && st) (void)st->delete_point(d.store_point);
      }
      Status s = db_->delete_point(p.collection, p.name);
      if (!s.ok()) return s;
    }
  }
  return db_->fail_in_progress_operations("daemon restarted while the operation was running", now);
}

void RestoreServiceImpl::spawn(std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(jobs_mu_);
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    if (it->done->load()) {
      it->thread.join();
      it = jobs_.erase(it);
    } else {
      ++it;
    }
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  jobs_.push_back({std::thread([fn = std::move(fn), done] {
                     fn();
                     done->store(true);
                   }),
                   done});
}

void RestoreServiceImpl::shutdown() {
  stopping_.store(true);
  std::list<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    jobs.swap(jobs_);
  }
  for (auto& j : jobs) j.thread.join();
}

std::shared_ptr<store::Store> RestoreServiceImpl::store_of(const std::string& region) {
  auto it = stores_.find(region);
  return it == stores_.end() ? nullptr : it->second;
}

FreezeHooks RestoreServiceImpl::hooks_for(const std::string& vm) const {
  auto it = options_.vm_hooks.find(vm);
  return it != options_.vm_hooks.end() ? it->second : options_.default_hooks;
}

OperationRecord RestoreServiceImpl::new_operation(const std::string& kind,
                                                  const std::string& resource_id) {
  OperationRecord op;
  op.id = NewOperationId();
  op.kind = kind;
  op.resource_id = resource_id;
  op.status = "InProgress";
  op.start_time = NowRfc3339();
  return op;
}

void RestoreServiceImpl::finish_operation(OperationRecord& op, const JobError* err,
                                          nlohmann::json result) {
  op.end_time = NowRfc3339();
  op.result = std::move(result);
  if (err) {
    op.status = "Failed";
    op.error_code = err->code;
    op.error_message = err->message;
  } else {
    op.status = "Succeeded";
    op.percent_complete = 100;
  }
  std::lock_guard<std::mutex> lock(mu_);
  Status s = db_->save_operation(op);
  if (!s.ok()) spdlog::error("operation {}: cannot record its end: {}", op.id, s.ToString());
  live_ops_.erase(op.id);
}

void RestoreServiceImpl::request_gc(const std::string& region) {
  {
    std::lock_guard<std::mutex> lock(gc_mu_);
    if (gc_running_.count(region)) {
      gc_again_.insert(region);  // the running pass may have started before this delete
      return;
    }
    gc_running_.insert(region);
  }
  spawn([this, region] {
    auto st = store_of(region);
    for (;;) {
      if (st && !stopping_.load()) {
        auto r = st->collect_garbage();
        if (!r.ok()) {
          spdlog::warn("region {}: garbage collection failed: {}", region, r.status().ToString());
        } else {
          spdlog::info("region {}: GC freed {} objects, {} packs deleted, {} repacked", region,
                       r->objects_deleted, r->packs_deleted, r->packs_repacked);
        }
      }
      std::lock_guard<std::mutex> lock(gc_mu_);
      if (!gc_again_.erase(region) || stopping_.load()) {
        gc_running_.erase(region);
        return;
      }
    }
  });
}

// ---------------------------------------------------------------------------
// VMs

Result<std::pair<VmRecord, bool>> RestoreServiceImpl::put_vm(const std::string& name,
                                                             const std::vector<std::string>& disks,
                                                             const nlohmann::json& configuration) {
  Status s = ValidateResourceName("VM", name);
  if (!s.ok()) return s;
  std::set<std::string> seen;
  for (const auto& d : disks) {
    if (!seen.insert(d).second) {
      return Status::InvalidArgument("disk '" + d + "' is listed twice");
    }
    auto rec = disks_.get(d);
    if (!rec.ok()) {
      if (rec.status().code() == Code::kNotFound) {
        return Status::InvalidArgument("disk '" + d + "' does not exist");
      }
      return rec.status();
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& d : disks) {
    auto owner = db_->vm_of_disk(d);
    if (!owner.ok()) return owner.status();
    if (owner.value() && *owner.value() != name) {
      return Status::Conflict("disk '" + d + "' already belongs to VM '" + *owner.value() + "'");
    }
  }
  auto old = db_->get_vm(name);
  if (!old.ok()) return old.status();
  VmRecord vm;
  vm.name = name;
  vm.disks = disks;
  vm.configuration = configuration.is_null() ? nlohmann::json::object() : configuration;
  vm.time_created = old.value() ? old.value()->time_created : NowRfc3339();
  s = db_->put_vm(vm);
  if (!s.ok()) return s;
  spdlog::info("vm {}: {} with {} disk(s)", name, old.value() ? "replaced" : "created",
               disks.size());
  return std::make_pair(vm, !old.value().has_value());
}

Result<VmRecord> RestoreServiceImpl::get_vm(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto vm = db_->get_vm(name);
  if (!vm.ok()) return vm.status();
  if (!vm.value()) return Status::NotFound("VM '" + name + "' not found");
  return *vm.value();
}

std::vector<VmRecord> RestoreServiceImpl::list_vms() {
  std::lock_guard<std::mutex> lock(mu_);
  auto vms = db_->list_vms();
  if (!vms.ok()) {
    spdlog::error("list VMs: {}", vms.status().ToString());
    return {};
  }
  return std::move(vms).value();
}

Status RestoreServiceImpl::delete_vm(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  Status s = db_->delete_vm(name);
  if (s.ok()) spdlog::info("vm {}: deleted (its collections stay)", name);
  return s;
}

std::optional<std::string> RestoreServiceImpl::vm_of_disk(const std::string& disk) {
  std::lock_guard<std::mutex> lock(mu_);
  auto vm = db_->vm_of_disk(disk);
  if (!vm.ok()) return std::nullopt;
  return vm.value();
}

// ---------------------------------------------------------------------------
// Collections

Result<std::pair<CollectionRecord, bool>> RestoreServiceImpl::put_collection(
    const std::string& name, const std::string& source_vm, const std::string& region_in) {
  Status s = ValidateResourceName("collection", name);
  if (!s.ok()) return s;
  std::string region = region_in.empty() ? default_region_ : region_in;
  if (!stores_.count(region)) {
    std::string known;
    for (const auto& r : options_.regions) known += (known.empty() ? "" : ", ") + r.name;
    return Status::InvalidArgument("unknown region '" + region + "'; regions: " + known);
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto existing = db_->get_collection(name);
  if (!existing.ok()) return existing.status();
  if (existing.value()) {
    const auto& c = *existing.value();
    if (c.source_vm == source_vm && c.region == region) return std::make_pair(c, false);
    return Status::Conflict("collection '" + name + "' exists with source /vms/" + c.source_vm +
                            " in region " + c.region + "; a collection cannot be changed");
  }
  auto vm = db_->get_vm(source_vm);
  if (!vm.ok()) return vm.status();
  if (!vm.value()) return Status::NotFound("VM '" + source_vm + "' not found");
  auto other = db_->collection_of_vm(source_vm);
  if (!other.ok()) return other.status();
  if (other.value()) {
    return Status::Conflict("VM '" + source_vm + "' already has the collection '" +
                            other.value()->name + "'");
  }
  CollectionRecord c;
  c.name = name;
  c.source_vm = source_vm;
  c.region = region;
  c.time_created = NowRfc3339();
  s = db_->insert_collection(c);
  if (!s.ok()) return s;
  spdlog::info("collection {}: created for VM {} in region {}", name, source_vm, region);
  return std::make_pair(c, true);
}

Result<CollectionRecord> RestoreServiceImpl::get_collection(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto c = db_->get_collection(name);
  if (!c.ok()) return c.status();
  if (!c.value()) return Status::NotFound("collection '" + name + "' not found");
  CollectionRecord r = *c.value();
  if (deleting_collections_.count(name)) r.provisioning_state = "Deleting";
  return r;
}

std::vector<CollectionRecord> RestoreServiceImpl::list_collections() {
  std::lock_guard<std::mutex> lock(mu_);
  auto cs = db_->list_collections();
  if (!cs.ok()) {
    spdlog::error("list collections: {}", cs.status().ToString());
    return {};
  }
  for (auto& c : cs.value()) {
    if (deleting_collections_.count(c.name)) c.provisioning_state = "Deleting";
  }
  return std::move(cs).value();
}

Status RestoreServiceImpl::delete_collection(const std::string& name) {
  std::vector<RestorePointRecord> points;
  std::string region;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto c = db_->get_collection(name);
    if (!c.ok()) return c.status();
    if (!c.value()) return Status::NotFound("collection '" + name + "' not found");
    if (deleting_collections_.count(name)) {
      return Status::Conflict("collection '" + name + "' is being deleted");
    }
    region = c.value()->region;
    auto ps = db_->list_points(name);
    if (!ps.ok()) return ps.status();
    for (const auto& p : ps.value()) {
      if (p.provisioning_state == "Creating") {
        return Status::Conflict("restore point '" + p.name + "' of collection '" + name +
                                "' is being created");
      }
    }
    // Points become Deleting first: after a crash in the middle, Open finishes the job.
    for (auto p : ps.value()) {
      p.provisioning_state = "Deleting";
      Status s = db_->save_point(p);
      if (!s.ok()) return s;
      points.push_back(std::move(p));
    }
    deleting_collections_.insert(name);
  }
  for (const auto& p : points) purge_point(p, region);
  {
    std::lock_guard<std::mutex> lock(mu_);
    deleting_collections_.erase(name);
    Status s = db_->delete_collection(name);
    if (!s.ok()) return s;
  }
  spdlog::info("collection {}: deleted with {} restore point(s)", name, points.size());
  if (!points.empty()) request_gc(region);
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Restore points

Result<Started<RestorePointRecord>> RestoreServiceImpl::create_restore_point(
    const std::string& collection, const std::string& name,
    const std::vector<std::string>& exclude_in, const std::string& mode_in) {
  Status s = ValidateResourceName("restore point", name);
  if (!s.ok()) return s;
  std::string mode = mode_in.empty() ? "CrashConsistent" : mode_in;
  if (mode != "CrashConsistent" && mode != "FileSystemConsistent") {
    return Status::InvalidArgument(
        "consistencyMode must be CrashConsistent or "
        "FileSystemConsistent, got '" +
        mode_in + "'");
  }
  std::vector<std::string> exclude = exclude_in;
  std::sort(exclude.begin(), exclude.end());
  exclude.erase(std::unique(exclude.begin(), exclude.end()), exclude.end());

  std::unique_lock<std::mutex> lock(mu_);
  auto coll = db_->get_collection(collection);
  if (!coll.ok()) return coll.status();
  if (!coll.value()) return Status::NotFound("collection '" + collection + "' not found");
  if (deleting_collections_.count(collection)) {
    return Status::Conflict("collection '" + collection + "' is being deleted");
  }
  const std::string vm_name = coll.value()->source_vm;
  const std::string region = coll.value()->region;

  auto existing = db_->get_point(collection, name);
  if (!existing.ok()) return existing.status();
  if (existing.value()) {
    RestorePointRecord p = *existing.value();
    std::vector<std::string> had = p.exclude_disks;
    std::sort(had.begin(), had.end());
    if (had == exclude && p.consistency_mode == mode && p.provisioning_state != "Deleting") {
      overlay(p);
      std::string op = p.operation_id;
      return Started<RestorePointRecord>{std::move(p), op, false};
    }
    return Status::Conflict("restore point '" + name + "' already exists in collection '" +
                            collection + "'; restore points cannot be updated");
  }
  auto vm = db_->get_vm(vm_name);
  if (!vm.ok()) return vm.status();
  if (!vm.value()) {
    return Status::NotFound("VM '" + vm_name + "' of collection '" + collection + "' not found");
  }
  if (creating_vms_.count(vm_name)) {
    return Status::Conflict("VM '" + vm_name + "' already has a restore point being created");
  }
  for (const auto& x : exclude) {
    if (std::find(vm.value()->disks.begin(), vm.value()->disks.end(), x) ==
        vm.value()->disks.end()) {
      return Status::InvalidArgument("excluded disk '" + x + "' is not a disk of VM '" + vm_name +
                                     "'");
    }
  }
  if (mode == "FileSystemConsistent" && hooks_for(vm_name).freeze.empty()) {
    return Status::InvalidArgument(
        "FileSystemConsistent restore points need a freeze hook for "
        "VM '" +
        vm_name + "' (consistency: in the configuration)");
  }

  RestorePointRecord rec;
  rec.collection = collection;
  rec.name = name;
  rec.consistency_mode = mode;
  rec.exclude_disks = exclude;
  rec.provisioning_state = "Creating";
  rec.time_created = NowRfc3339();
  nlohmann::json disks_json = nlohmann::json::array();
  for (const auto& d : vm.value()->disks) {
    if (std::binary_search(exclude.begin(), exclude.end(), d)) continue;
    auto dr = disks_.get(d);
    if (!dr.ok()) {
      return Status::Conflict("disk '" + d + "' of VM '" + vm_name + "': " + dr.status().message());
    }
    if (dr->kind == "shared" || dr->kind == "ephemeral") {
      return Status::InvalidArgument("disk '" + d + "' is " + dr->kind +
                                     "; exclude it (excludeDisks) to create a restore point");
    }
    if (!dr->error.empty()) {
      return Status::Conflict("disk '" + d + "' is unavailable: " + dr->error);
    }
    if (dr->provisioning_state != "Succeeded") {
      return Status::Conflict("disk '" + d + "' is still being provisioned");
    }
    auto fd = disks_.file_disk(d);
    if (!fd || !fd->tracker()) {
      return Status::Unsupported("disk '" + d + "' has no change tracking (tracking_dir unset?)");
    }
    DiskRestorePointRecord drp;
    drp.disk = d;
    drp.size_bytes = dr->size_bytes;
    drp.granularity = fd->tracker()->granularity();
    drp.status = "Pending";
    rec.disk_restore_points.push_back(drp);
    disks_json.push_back({{"name", d},
                          {"id", "/disks/" + d},
                          {"sizeBytes", dr->size_bytes},
                          {"kind", dr->kind},
                          {"diskRestorePoint", {{"id", DiskPointId(collection, name, d)}}}});
  }
  if (rec.disk_restore_points.empty()) {
    return Status::InvalidArgument("VM '" + vm_name + "' has no disk left to include");
  }
  rec.source_metadata = {{"vmId", "/vms/" + vm_name},
                         {"vmName", vm_name},
                         {"configuration", vm.value()->configuration},
                         {"storageProfile", {{"disks", disks_json}}}};
  OperationRecord op = new_operation("CreateRestorePoint", PointId(collection, name));
  rec.operation_id = op.id;
  s = db_->save_point(rec, &op);
  if (!s.ok()) return s;
  auto prog = std::make_shared<PointProgress>(rec.disk_restore_points.size());
  live_points_[collection + "/" + name] = prog;
  creating_vms_.insert(vm_name);
  lock.unlock();

  spdlog::info("restore point {}/{}: creating ({}, {} disk(s)), operation {}", collection, name,
               mode, rec.disk_restore_points.size(), op.id);
  spawn(
      [this, rec, op, vm_name, region, prog] { run_create_point(rec, op, vm_name, region, prog); });
  return Started<RestorePointRecord>{rec, op.id, true};
}

void RestoreServiceImpl::overlay(RestorePointRecord& p) {
  auto it = live_points_.find(p.collection + "/" + p.name);
  if (it == live_points_.end() || p.provisioning_state != "Creating") return;
  const PointProgress& prog = *it->second;
  for (size_t i = 0; i < p.disk_restore_points.size() && i < prog.copied.size(); ++i) {
    auto& d = p.disk_restore_points[i];
    if (d.status == "Succeeded" || !prog.started[i].load()) continue;
    d.status = "InProgress";
    d.blocks_to_copy = prog.to_copy[i].load();
    d.blocks_copied = prog.copied[i].load();
    d.completion_percent =
        d.blocks_to_copy
            ? static_cast<int>(std::min<uint64_t>(99, d.blocks_copied * 100 / d.blocks_to_copy))
            : 0;
  }
}

void RestoreServiceImpl::run_create_point(RestorePointRecord rec, OperationRecord op,
                                          std::string vm, std::string region,
                                          std::shared_ptr<PointProgress> prog) {
  std::vector<std::pair<std::shared_ptr<FileDisk>, uint64_t>> to_retire;
  std::optional<JobError> err = create_point(rec, vm, region, *prog, &to_retire);
  auto st = store_of(region);
  if (err) {
    spdlog::error("restore point {}/{}: failed: {}: {}", rec.collection, rec.name, err->code,
                  err->message);
    for (auto& d : rec.disk_restore_points) {
      // Disk points committed before another disk failed belong to no point.
      if (d.store_point && st) (void)st->delete_point(d.store_point);
      d.store_point = 0;
      if (d.status != "Succeeded") d.status = "Failed";
    }
    rec.provisioning_state = "Failed";
    rec.error_code = err->code;
    rec.error_message = err->message;
  } else {
    rec.provisioning_state = "Succeeded";
  }
  // One critical section from the record to the VM being free again, so a
  // client that sees the operation end can start the next point at once (and
  // that point's cut finds the trackers already retired).
  std::lock_guard<std::mutex> lock(mu_);
  op.end_time = NowRfc3339();
  if (err) {
    op.status = "Failed";
    op.error_code = err->code;
    op.error_message = err->message;
  } else {
    op.status = "Succeeded";
    op.percent_complete = 100;
  }
  std::vector<TrackingBase> bases;
  if (!err) {
    for (const auto& d : rec.disk_restore_points) {
      bases.push_back({d.disk, rec.collection, rec.name, d.store_point, d.granularity});
    }
  }
  // One transaction: the point, its operation and (on success) the disks' new
  // bases, so the point and the parents of the next points move together.
  Status s = db_->save_point(rec, &op, err ? nullptr : &bases);
  if (!s.ok()) {
    spdlog::error("restore point {}/{}: cannot record its end: {}", rec.collection, rec.name,
                  s.ToString());
  } else if (!err) {
    // Only now may the trackers forget: a crash before this leaves their
    // generations in place and the next point copies a superset (harmless).
    for (auto& [disk, gen] : to_retire) {
      Status r = disk->tracker()->retire_through(gen);
      if (!r.ok()) {
        spdlog::warn("restore point {}/{}: disk {}: retiring tracked changes: {}", rec.collection,
                     rec.name, disk->name(), r.ToString());
      }
    }
    uint64_t stored = 0;
    for (const auto& d : rec.disk_restore_points) stored += d.bytes_stored;
    spdlog::info("restore point {}/{}: succeeded, {} new bytes stored", rec.collection, rec.name,
                 stored);
  }
  live_points_.erase(rec.collection + "/" + rec.name);
  creating_vms_.erase(vm);
}

std::optional<JobError> RestoreServiceImpl::create_point(
    RestorePointRecord& rec, const std::string& vm, const std::string& region, PointProgress& prog,
    std::vector<std::pair<std::shared_ptr<FileDisk>, uint64_t>>* to_retire) {
  auto st = store_of(region);
  if (!st) return JobError{"RegionUnavailable", "region '" + region + "' is not configured"};
  const size_t n = rec.disk_restore_points.size();

  // Which disks can be incremental: their tracking base is a Succeeded point
  // of this collection whose store point still exists with the same chunk
  // size. Everything else is forced full (the tracker may have retired
  // generations against a base this collection cannot use).
  std::vector<std::shared_ptr<FileDisk>> fdisks;
  std::vector<bool> force_full(n, true);
  std::vector<uint64_t> parent(n, 0);
  for (size_t i = 0; i < n; ++i) {
    auto& d = rec.disk_restore_points[i];
    auto fd = disks_.file_disk(d.disk);
    if (!fd || !fd->tracker() || fd->retired()) {
      return JobError{"DiskUnavailable", "disk '" + d.disk + "' is gone or unavailable"};
    }
    fdisks.push_back(fd);
    std::optional<TrackingBase> base;
    std::optional<RestorePointRecord> base_point;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto b = db_->tracking_base(d.disk);
      if (b.ok() && b.value() && b.value()->collection == rec.collection) {
        base = b.value();
        auto bp = db_->get_point(base->collection, base->restore_point);
        if (bp.ok() && bp.value()) base_point = bp.value();
      }
    }
    if (!base || !base_point || base_point->provisioning_state != "Succeeded") continue;
    if (base->granularity != fd->tracker()->granularity()) continue;
    bool named = false;
    for (const auto& bd : base_point->disk_restore_points) {
      named |= bd.disk == d.disk && bd.store_point == base->store_point;
    }
    if (!named) continue;
    auto info = st->point(base->store_point);
    if (!info.ok() || info->chunk_size != fd->tracker()->granularity() || info->size > fd->size()) {
      continue;
    }
    force_full[i] = false;
    parent[i] = base->store_point;
  }

  const bool fs = rec.consistency_mode == "FileSystemConsistent";
  FreezeHooks hooks = hooks_for(vm);
  std::map<std::string, std::string> env = {
      {"RPOINT_VM", vm}, {"RPOINT_COLLECTION", rec.collection}, {"RPOINT_RESTORE_POINT", rec.name}};
  auto thaw = [&] {
    if (hooks.thaw.empty()) return;
    env["RPOINT_PHASE"] = "thaw";
    HookResult r = RunHook(hooks.thaw, env, options_.hook_timeout_seconds);
    if (!r.ran || r.timed_out || r.exit_status != 0) {
      spdlog::warn("restore point {}/{}: {}", rec.collection, rec.name,
                   DescribeHookFailure("thaw", hooks.thaw, r));
    }
  };
  if (fs) {
    env["RPOINT_PHASE"] = "freeze";
    HookResult r = RunHook(hooks.freeze, env, options_.hook_timeout_seconds);
    if (!r.ran || r.timed_out || r.exit_status != 0) {
      thaw();
      return JobError{"FreezeFailed", DescribeHookFailure("freeze", hooks.freeze, r)};
    }
  }
  auto cut = CutDisks(fdisks, options_.staging_dir, rec.collection + "." + rec.name, force_full);
  if (fs) thaw();
  if (!cut.ok()) return JobError{"CutFailed", cut.status().message()};
  // From here on every disk has a snapshot to end, whatever happens.
  struct EndSnapshots {
    std::vector<std::shared_ptr<FileDisk>>& disks;
    ~EndSnapshots() {
      for (auto& d : disks) d->end_snapshot();
    }
  } end_snapshots{fdisks};
  std::vector<std::shared_ptr<DiskSnapshot>>& snaps = cut->snapshots;

  rec.cut_pause_ns = cut->pause.count();
  rec.time_created = NowRfc3339();
  for (size_t i = 0; i < n; ++i) {
    auto& d = rec.disk_restore_points[i];
    d.size_bytes = snaps[i]->size();
    d.granularity = snaps[i]->granularity();
    d.full = snaps[i]->full();
    d.parent_store_point = d.full ? 0 : parent[i];
    d.status = "InProgress";
    auto& sd = rec.source_metadata["storageProfile"]["disks"];
    for (auto& j : sd) {
      if (j.value("name", "") == d.disk) j["sizeBytes"] = d.size_bytes;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    Status s = db_->save_point(rec);
    if (!s.ok()) return JobError{"InternalError", s.message()};
  }
  spdlog::info("restore point {}/{}: cut {} disk(s) in {} us", rec.collection, rec.name, n,
               rec.cut_pause_ns / 1000);

  for (size_t i = 0; i < n; ++i) {
    auto& d = rec.disk_restore_points[i];
    prog.started[i].store(true);
    auto info =
        copy_disk(*st, *snaps[i], d.parent_store_point,
                  DiskPointId(rec.collection, rec.name, d.disk), prog.to_copy[i], prog.copied[i]);
    if (!info.ok()) {
      d.status = "Failed";
      return JobError{info.status().code() == Code::kShutdown ? "Interrupted" : "CopyFailed",
                      "disk '" + d.disk + "': " + info.status().message()};
    }
    d.store_point = info->id;
    d.bytes_stored = info->new_chunk_bytes;
    d.blocks_to_copy = prog.to_copy[i].load();
    d.blocks_copied = prog.copied[i].load();
    d.completion_percent = 100;
    d.status = "Succeeded";
  }

  // The snapshots end (EndSnapshots) before run_create_point records the
  // point and retires the trackers.
  for (size_t i = 0; i < n; ++i) to_retire->emplace_back(fdisks[i], snaps[i]->generation());
  return std::nullopt;
}

Result<store::PointInfo> RestoreServiceImpl::copy_disk(store::Store& st, DiskSnapshot& snap,
                                                       uint64_t parent, const std::string& tag,
                                                       std::atomic<uint64_t>& to_copy,
                                                       std::atomic<uint64_t>& copied) {
  auto bits = snap.to_copy();
  if (!bits.ok()) return bits.status();
  to_copy.store(bits->count());
  store::PointParams pp;
  pp.parent = parent;
  pp.size = snap.size();
  pp.chunk_size = snap.granularity();
  pp.tag = tag;
  auto writer = st.begin_point(pp);
  if (!writer.ok()) return writer.status();
  store::PointWriter& w = *writer.value();

  std::mutex mu;
  uint64_t cursor = 0;
  Status failure;
  auto work = [&] {
    std::vector<char> buf(snap.granularity());
    for (;;) {
      uint64_t b;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!failure.ok()) return;
        if (stopping_.load()) {
          failure = Status::Shutdown("daemon stopping");
          return;
        }
        b = bits->find_next(cursor);
        if (b >= bits->size()) return;
        cursor = b + 1;
      }
      Status s = snap.read_block(b, buf.data());
      if (s.ok()) s = w.put(b, buf.data(), w.slot_bytes(b));
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (failure.ok()) failure = s;
        return;
      }
      copied.fetch_add(1);
    }
  };
  unsigned nthreads = std::max(1u, options_.copy_threads);
  std::vector<std::thread> threads;
  for (unsigned t = 1; t < nthreads; ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  if (failure.ok() && snap.broken()) {
    failure = Status::IoError("copy-before-write failed: " + snap.broken_reason());
  }
  if (!failure.ok()) {
    w.abandon();
    return failure;
  }
  return w.commit();
}

Result<RestorePointRecord> RestoreServiceImpl::get_restore_point(const std::string& collection,
                                                                 const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto c = db_->get_collection(collection);
  if (!c.ok()) return c.status();
  if (!c.value()) return Status::NotFound("collection '" + collection + "' not found");
  auto p = db_->get_point(collection, name);
  if (!p.ok()) return p.status();
  if (!p.value()) {
    return Status::NotFound("restore point '" + name + "' not found in collection '" + collection +
                            "'");
  }
  RestorePointRecord r = *p.value();
  overlay(r);
  return r;
}

Result<std::vector<RestorePointRecord>> RestoreServiceImpl::list_restore_points(
    const std::string& collection) {
  std::lock_guard<std::mutex> lock(mu_);
  auto c = db_->get_collection(collection);
  if (!c.ok()) return c.status();
  if (!c.value()) return Status::NotFound("collection '" + collection + "' not found");
  auto ps = db_->list_points(collection);
  if (!ps.ok()) return ps.status();
  for (auto& p : ps.value()) overlay(p);
  return std::move(ps).value();
}

void RestoreServiceImpl::purge_point(const RestorePointRecord& p, const std::string& region) {
  auto st = store_of(region);
  for (const auto& d : p.disk_restore_points) {
    if (!d.store_point || !st) continue;
    Status s = st->delete_point(d.store_point);
    if (!s.ok() && s.code() != Code::kNotFound) {
      spdlog::warn("restore point {}/{}: disk {}: {}", p.collection, p.name, d.disk, s.ToString());
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  Status s = db_->delete_point(p.collection, p.name);
  if (!s.ok()) spdlog::error("restore point {}/{}: {}", p.collection, p.name, s.ToString());
  for (const auto& d : p.disk_restore_points) {
    std::string name = p.collection + "/" + p.name + "/" + d.disk;
    auto it = devices_.find(name);
    if (it == devices_.end()) continue;
    if (auto dev = it->second.lock()) dev->retire();  // attached clients are cut off
    devices_.erase(it);
  }
}

Status RestoreServiceImpl::delete_restore_point(const std::string& collection,
                                                const std::string& name) {
  RestorePointRecord p;
  std::string region;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto c = db_->get_collection(collection);
    if (!c.ok()) return c.status();
    if (!c.value()) return Status::NotFound("collection '" + collection + "' not found");
    region = c.value()->region;
    auto r = db_->get_point(collection, name);
    if (!r.ok()) return r.status();
    if (!r.value()) {
      return Status::NotFound("restore point '" + name + "' not found in collection '" +
                              collection + "'");
    }
    p = *r.value();
    if (p.provisioning_state == "Creating") {
      return Status::Conflict("restore point '" + name + "' is being created");
    }
    p.provisioning_state = "Deleting";
    Status s = db_->save_point(p);
    if (!s.ok()) return s;
  }
  purge_point(p, region);
  spdlog::info("restore point {}/{}: deleted", collection, name);
  request_gc(region);
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Verify

Result<std::string> RestoreServiceImpl::start_verify(const std::string& collection,
                                                     const std::string& name) {
  RestorePointRecord rec;
  std::string region;
  OperationRecord op;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto c = db_->get_collection(collection);
    if (!c.ok()) return c.status();
    if (!c.value()) return Status::NotFound("collection '" + collection + "' not found");
    region = c.value()->region;
    auto p = db_->get_point(collection, name);
    if (!p.ok()) return p.status();
    if (!p.value()) {
      return Status::NotFound("restore point '" + name + "' not found in collection '" +
                              collection + "'");
    }
    rec = *p.value();
    if (rec.provisioning_state != "Succeeded") {
      return Status::Conflict("restore point '" + name + "' is " + rec.provisioning_state +
                              "; only Succeeded points can be verified");
    }
    op = new_operation("Verify", PointId(collection, name));
    Status s = db_->save_operation(op);
    if (!s.ok()) return s;
    live_ops_[op.id] = std::make_shared<std::atomic<int>>(0);
  }
  spawn([this, rec, op, region] { run_verify(rec, op, region); });
  return op.id;
}

void RestoreServiceImpl::run_verify(RestorePointRecord rec, OperationRecord op,
                                    std::string region) {
  std::shared_ptr<std::atomic<int>> pct;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pct = live_ops_[op.id];
  }
  auto st = store_of(region);
  nlohmann::json damage = nlohmann::json::array();
  uint64_t chunks = 0, bytes = 0;
  bool ok = true;
  std::optional<JobError> err;
  for (size_t i = 0; i < rec.disk_restore_points.size() && !err; ++i) {
    const auto& d = rec.disk_restore_points[i];
    if (stopping_.load()) {
      err = JobError{"Interrupted", "daemon stopping"};
      break;
    }
    auto r =
        st ? st->verify(d.store_point) : Result<store::VerifyReport>(Status::NotFound("region"));
    if (!r.ok()) {
      err = JobError{"VerifyFailed", "disk '" + d.disk + "': " + r.status().message()};
      break;
    }
    chunks += r->chunks_checked;
    bytes += r->bytes_read;
    ok &= r->ok();
    for (const auto& dm : r->damage) {
      uint64_t off = dm.first_slot * d.granularity;
      uint64_t len = dm.slot_count * uint64_t{d.granularity};
      if (off > d.size_bytes) off = d.size_bytes;
      len = std::min(len, d.size_bytes - off);
      damage.push_back({{"disk", d.disk},
                        {"kind", dm.kind == store::Damage::Kind::kChunk ? "Chunk" : "Page"},
                        {"digest", dm.digest.hex()},
                        {"offset", off},
                        {"length", len},
                        {"reason", dm.reason}});
    }
    for (const auto& pp : r->pack_problems) {
      damage.push_back({{"disk", d.disk},
                        {"kind", "Pack"},
                        {"digest", ""},
                        {"offset", 0},
                        {"length", 0},
                        {"reason", "pack " + std::to_string(pp.pack) + ": " + pp.reason}});
    }
    if (pct) pct->store(static_cast<int>((i + 1) * 100 / rec.disk_restore_points.size()));
  }
  nlohmann::json result;
  if (!err) {
    result = {{"ok", ok}, {"chunksChecked", chunks}, {"bytesRead", bytes}, {"damage", damage}};
    spdlog::info("restore point {}/{}: verify {}: {} chunk(s), {} damaged object(s)",
                 rec.collection, rec.name, ok ? "ok" : "FOUND DAMAGE", chunks, damage.size());
  }
  finish_operation(op, err ? &*err : nullptr, result);
}

// ---------------------------------------------------------------------------
// Restore

Status RestoreServiceImpl::fill_disk(const std::string& disk, store::Store& st,
                                     uint64_t store_point,
                                     const std::function<void(uint64_t, uint64_t)>& progress) {
  auto reader = st.open_point(store_point);
  if (!reader.ok()) return reader.status();
  auto rec = disks_.get(disk);
  if (!rec.ok()) return rec.status();
  UniqueFd fd(::open(rec->path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) return Status::FromErrno(errno, "open " + rec->path);
  store::PointReader& r = *reader.value();
  const uint64_t size = r.size();
  // Pass 1: the data runs (holes stay holes in the sparse file).
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  uint64_t total = 0;
  for (uint64_t pos = 0; pos < size;) {
    uint64_t len = std::min<uint64_t>(size - pos, uint64_t{1} << 36);
    auto ex = r.extents(pos, len, 65536);
    if (!ex.ok()) return ex.status();
    if (ex->empty()) break;
    for (const auto& e : ex.value()) {
      if (!(e.flags & Extent::kHole)) {
        runs.emplace_back(pos, e.length);
        total += e.length;
      }
      pos += e.length;
    }
  }
  constexpr uint64_t kPiece = 4u << 20;
  std::vector<char> buf(kPiece);
  uint64_t done = 0;
  for (const auto& [start, length] : runs) {
    for (uint64_t off = start; off < start + length;) {
      if (stopping_.load()) return Status::Shutdown("daemon stopping");
      uint64_t n = std::min(kPiece, start + length - off);
      Status s = r.read(off, n, buf.data());
      if (!s.ok()) return s;
      for (uint64_t w = 0; w < n;) {
        ssize_t k = ::pwrite(fd.get(), buf.data() + w, n - w, static_cast<off_t>(off + w));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return Status::FromErrno(k < 0 ? errno : EIO, "write " + rec->path);
        w += static_cast<uint64_t>(k);
      }
      off += n;
      done += n;
      progress(done, total);
    }
  }
  if (::fdatasync(fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + rec->path);
  return Status::Ok();
}

Result<std::string> RestoreServiceImpl::start_restore_disk(const std::string& disk,
                                                           const std::string& source_id) {
  Status s = DiskService::ValidateName(disk);
  if (!s.ok()) return s;
  // /restorePointCollections/c/restorePoints/rp/diskRestorePoints/d
  auto parts = Split(source_id, '/');
  if (parts.size() != 7 || !parts[0].empty() || parts[1] != "restorePointCollections" ||
      parts[3] != "restorePoints" || parts[5] != "diskRestorePoints") {
    return Status::InvalidArgument(
        "sourceResourceId must be /restorePointCollections/{c}/"
        "restorePoints/{rp}/diskRestorePoints/{disk}, got '" +
        source_id + "'");
  }
  const std::string c = parts[2], rp = parts[4], src = parts[6];
  DiskRestorePointRecord drp;
  std::string region;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto coll = db_->get_collection(c);
    if (!coll.ok()) return coll.status();
    if (!coll.value()) return Status::NotFound("collection '" + c + "' not found");
    region = coll.value()->region;
    auto p = db_->get_point(c, rp);
    if (!p.ok()) return p.status();
    if (!p.value()) return Status::NotFound("restore point '" + c + "/" + rp + "' not found");
    bool found = false;
    for (const auto& d : p.value()->disk_restore_points) {
      if (d.disk == src) {
        drp = d;
        found = true;
      }
    }
    if (!found) return Status::NotFound("disk restore point '" + source_id + "' not found");
    if (p.value()->provisioning_state != "Succeeded") {
      return Status::Conflict("restore point '" + c + "/" + rp + "' is " +
                              p.value()->provisioning_state + ", not Succeeded");
    }
  }
  auto created = disks_.create_provisioning(disk, drp.size_bytes, drp.granularity, source_id);
  if (!created.ok()) return created.status();
  OperationRecord op = new_operation("RestoreDisk", "/disks/" + disk);
  auto pct = std::make_shared<std::atomic<int>>(0);
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = db_->save_operation(op);
    if (s.ok()) live_ops_[op.id] = pct;
  }
  if (!s.ok()) {
    (void)disks_.remove(disk, true);
    return s;
  }
  spdlog::info("disk {}: restoring from {}, operation {}", disk, source_id, op.id);
  spawn([this, disk, drp, region, op, pct]() mutable {
    auto st = store_of(region);
    Status r =
        st ? fill_disk(disk, *st, drp.store_point,
                       [&](uint64_t done, uint64_t total) {
                         if (total)
                           pct->store(static_cast<int>(std::min<uint64_t>(99, done * 100 / total)));
                       })
           : Status::NotFound("region '" + region + "' is not configured");
    if (r.ok()) r = disks_.mark_provisioned(disk);
    if (!r.ok()) {
      spdlog::error("disk {}: restore failed: {}", disk, r.ToString());
      Status rm = disks_.remove(disk, true);
      if (!rm.ok()) spdlog::error("disk {}: cannot remove it: {}", disk, rm.ToString());
      JobError e{r.code() == Code::kShutdown ? "Interrupted" : "RestoreFailed", r.message()};
      finish_operation(op, &e);
      return;
    }
    spdlog::info("disk {}: restored", disk);
    finish_operation(op, nullptr);
  });
  return op.id;
}

Result<std::string> RestoreServiceImpl::start_restore_vm(
    const std::string& collection, const std::string& name, const std::string& vm,
    const std::map<std::string, std::string>& disk_names) {
  Status s = ValidateResourceName("VM", vm);
  if (!s.ok()) return s;
  RestorePointRecord rec;
  std::string region;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto coll = db_->get_collection(collection);
    if (!coll.ok()) return coll.status();
    if (!coll.value()) return Status::NotFound("collection '" + collection + "' not found");
    region = coll.value()->region;
    auto p = db_->get_point(collection, name);
    if (!p.ok()) return p.status();
    if (!p.value()) {
      return Status::NotFound("restore point '" + collection + "/" + name + "' not found");
    }
    rec = *p.value();
    if (rec.provisioning_state != "Succeeded") {
      return Status::Conflict("restore point '" + collection + "/" + name + "' is " +
                              rec.provisioning_state + ", not Succeeded");
    }
    auto existing = db_->get_vm(vm);
    if (!existing.ok()) return existing.status();
    if (existing.value()) return Status::Conflict("VM '" + vm + "' already exists");
  }
  for (const auto& [src, dst] : disk_names) {
    bool known = std::any_of(rec.disk_restore_points.begin(), rec.disk_restore_points.end(),
                             [&](const auto& d) { return d.disk == src; });
    if (!known) {
      return Status::InvalidArgument("diskNames: '" + src + "' is not a disk of restore point '" +
                                     name + "'");
    }
  }
  std::vector<std::string> targets;
  for (const auto& d : rec.disk_restore_points) {
    auto it = disk_names.find(d.disk);
    std::string t = it != disk_names.end() ? it->second : vm + "-" + d.disk;
    s = DiskService::ValidateName(t);
    if (!s.ok()) return s;
    if (std::find(targets.begin(), targets.end(), t) != targets.end()) {
      return Status::InvalidArgument("disk name '" + t + "' is used twice");
    }
    if (disks_.get(t).ok()) return Status::Conflict("disk '" + t + "' already exists");
    targets.push_back(t);
  }
  // Claim every name now (Creating disks), so conflicts show up here, not in the job.
  for (size_t i = 0; i < targets.size(); ++i) {
    const auto& d = rec.disk_restore_points[i];
    auto c = disks_.create_provisioning(targets[i], d.size_bytes, d.granularity,
                                        DiskPointId(collection, name, d.disk));
    if (!c.ok()) {
      for (size_t j = 0; j < i; ++j) (void)disks_.remove(targets[j], true);
      return c.status();
    }
  }
  OperationRecord op = new_operation("RestoreVm", "/vms/" + vm);
  auto pct = std::make_shared<std::atomic<int>>(0);
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = db_->save_operation(op);
    if (s.ok()) live_ops_[op.id] = pct;
  }
  if (!s.ok()) {
    for (const auto& t : targets) (void)disks_.remove(t, true);
    return s;
  }
  spdlog::info("vm {}: restoring from {}/{} ({} disk(s)), operation {}", vm, collection, name,
               targets.size(), op.id);
  spawn([this, rec, targets, vm, region, op, pct]() mutable {
    auto st = store_of(region);
    Status r = st ? Status::Ok() : Status::NotFound("region '" + region + "' is not configured");
    uint64_t total = 0;
    for (const auto& d : rec.disk_restore_points) total += d.size_bytes;
    uint64_t before = 0;
    for (size_t i = 0; i < targets.size() && r.ok(); ++i) {
      const auto& d = rec.disk_restore_points[i];
      r = fill_disk(targets[i], *st, d.store_point, [&](uint64_t done, uint64_t t) {
        uint64_t part = t ? d.size_bytes * done / t : 0;
        if (total)
          pct->store(static_cast<int>(std::min<uint64_t>(99, (before + part) * 100 / total)));
      });
      before += d.size_bytes;
    }
    for (size_t i = 0; i < targets.size() && r.ok(); ++i) r = disks_.mark_provisioned(targets[i]);
    if (r.ok()) {
      auto put =
          put_vm(vm, targets, rec.source_metadata.value("configuration", nlohmann::json::object()));
      r = put.ok() ? Status::Ok() : put.status();
    }
    if (!r.ok()) {
      spdlog::error("vm {}: restore failed: {}", vm, r.ToString());
      for (const auto& t : targets) (void)disks_.remove(t, true);
      JobError e{r.code() == Code::kShutdown ? "Interrupted" : "RestoreFailed", r.message()};
      finish_operation(op, &e);
      return;
    }
    spdlog::info("vm {}: restored", vm);
    finish_operation(op, nullptr);
  });
  return op.id;
}

Result<OperationRecord> RestoreServiceImpl::get_operation(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto o = db_->get_operation(id);
  if (!o.ok()) return o.status();
  if (!o.value()) return Status::NotFound("operation '" + id + "' not found");
  OperationRecord op = *o.value();
  if (op.status == "InProgress") {
    auto it = live_ops_.find(id);
    if (it != live_ops_.end()) op.percent_complete = it->second->load();
    if (op.kind == "CreateRestorePoint") {
      // resource_id = /restorePointCollections/c/restorePoints/rp
      auto parts = Split(op.resource_id, '/');
      if (parts.size() == 5) {
        auto lp = live_points_.find(parts[2] + "/" + parts[4]);
        if (lp != live_points_.end()) {
          uint64_t total = 0, done = 0;
          for (size_t i = 0; i < lp->second->copied.size(); ++i) {
            total += lp->second->to_copy[i].load();
            done += lp->second->copied[i].load();
          }
          op.percent_complete =
              total ? static_cast<int>(std::min<uint64_t>(99, done * 100 / total)) : 0;
        }
      }
    }
  }
  return op;
}

// ---------------------------------------------------------------------------
// Exports

std::shared_ptr<BlockDevice> RestoreServiceImpl::find_export(const std::string& name) {
  auto parts = Split(name, '/');
  if (parts.size() != 3) return nullptr;
  uint64_t sp = 0;
  std::string region;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = devices_.find(name);
    if (it != devices_.end()) {
      if (auto dev = it->second.lock(); dev && !dev->retired()) return dev;
    }
    auto coll = db_->get_collection(parts[0]);
    if (!coll.ok() || !coll.value()) return nullptr;
    region = coll.value()->region;
    auto p = db_->get_point(parts[0], parts[1]);
    if (!p.ok() || !p.value() || p.value()->provisioning_state != "Succeeded") return nullptr;
    for (const auto& d : p.value()->disk_restore_points) {
      if (d.disk == parts[2]) sp = d.store_point;
    }
  }
  auto st = store_of(region);
  if (!sp || !st) return nullptr;
  auto reader = st->open_point(sp);
  if (!reader.ok()) {
    spdlog::warn("export {}: {}", name, reader.status().ToString());
    return nullptr;
  }
  auto dev = store::PointDevice::Create(std::move(reader).value(), name);
  if (!dev.ok()) {
    spdlog::warn("export {}: {}", name, dev.status().ToString());
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = devices_.find(name);
  if (it != devices_.end()) {
    if (auto other = it->second.lock(); other && !other->retired()) return other;  // raced
  }
  devices_[name] = dev.value();
  return dev.value();
}

std::vector<ExportResolver::ExportInfo> RestoreServiceImpl::list_exports() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ExportInfo> out;
  auto ps = db_->list_points("");
  if (!ps.ok()) return out;
  for (const auto& p : ps.value()) {
    if (p.provisioning_state != "Succeeded") continue;
    for (const auto& d : p.disk_restore_points) {
      out.push_back({p.collection + "/" + p.name + "/" + d.disk,
                     "rpointd restore point " + p.collection + "/" + p.name + " disk " + d.disk +
                         " (read-only)"});
    }
  }
  return out;
}

}  // namespace rpoint
