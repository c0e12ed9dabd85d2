// Creating a restore point: validation, then the job (hooks, cut, copy,
// commit, the one transaction that makes it Succeeded, tracker retirement).
// docs/restore-points.md explains the parent choice and crash behaviour.
#include <fcntl.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <thread>

#include "common/unique_fd.h"
#include "disks/disk_files.h"
#include "disks/disk_service.h"
#include "engine/cut.h"
#include "engine/file_disk.h"
#include "restore/hooks.h"
#include "restore/manifest.h"
#include "restore/restore_service_impl.h"
#include "store/point_writer.h"

namespace rpoint {
namespace {

// How long a finished point waits for pre-cut writes before it keeps their
// generations instead of retiring them.
constexpr std::chrono::milliseconds kRetireWait{30000};

}  // namespace

// ---------------------------------------------------------------------------
// Restore points

Result<Started<RestorePointRecord>> RestoreServiceImpl::create_restore_point(
    const std::string& collection, const std::string& name,
    const std::vector<std::string>& exclude_in, const std::string& mode_in) {
  if (stopping_.load()) return Status::Shutdown("rpointd is stopping");
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
  auto coll = collection_for_new_point_locked(collection);
  if (!coll.ok()) return coll.status();
  const std::string vm_name = coll.value().source_vm;
  const std::string region = coll.value().region;
  if (const RegionSpec* peer = peer_region(region)) {
    return Status::InvalidArgument("collection '" + collection + "' is in region '" + region +
                                   "', kept by peer " + peer->peer +
                                   ": its restore points are made by copy "
                                   "(properties.sourceRestorePoint)");
  }

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
  auto u = unrecorded_.find(p.collection + "/" + p.name);
  if (u != unrecorded_.end() && p.provisioning_state == "Creating") {
    p = u->second.first;
    return;
  }
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
  if (!err && st) {
    // The region's own record of the point (restore/manifest.h), after every
    // store commit and before the transaction that makes it Succeeded: a
    // crash in between leaves it Creating here, and Open removes it.
    err = write_manifest(*st, rec);
  }
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
  std::unique_lock<std::mutex> lock(mu_);
  record_unrecorded_locked();
  EndOperation(op, err ? &*err : nullptr, NowRfc3339());
  std::vector<TrackingBase> bases;
  std::vector<StoreRef> freed;  // retained bases this point replaces
  if (!err) {
    for (const auto& d : rec.disk_restore_points) {
      auto old = db_->tracking_base(d.disk, rec.collection);
      TrackingBase b{d.disk, rec.collection, rec.name, d.store_point, d.granularity};
      auto cut = std::find_if(to_retire.begin(), to_retire.end(),
                              [&](const auto& r) { return r.first->name() == d.disk; });
      auto fd = disks_.file_disk(d.disk);
      b.tracker_id = fd && fd->tracker() ? fd->tracker()->id() : 0;
      if (cut != to_retire.end()) {
        b.generation = cut->second;
      } else if (old.ok() && old.value() && !d.full) {
        // Writes from before the cut were still in flight when the copy
        // ended: one could still land after the copy read its block, marked
        // only in the generation just cut. The next point copies from the
        // previous base's generation on (a superset, never less).
        b.generation = old.value()->generation;
        b.tracker_id = old.value()->tracker_id;
      }
      bases.push_back(b);
      if (old.ok() && old.value() && old.value()->retained &&
          old.value()->store_point != d.store_point) {
        auto c = db_->get_collection(old.value()->collection);
        if (c.ok() && c.value()) freed.push_back({c.value()->region, old.value()->store_point});
        spdlog::info("restore point {}/{}: disk {}: replaces the retained base (store point {})",
                     rec.collection, rec.name, d.disk, old.value()->store_point);
      }
    }
  }
  // One transaction: the point, its operation and (on success) the disks' new
  // bases, so the point and the parents of the next points move together.
  Status s = save_point_retrying_locked(rec, &op, err ? nullptr : &bases);
  if (!s.ok() && !err) {
    // Not recorded Succeeded, so it is not one: it fails, and its store points
    // go. The disks' bases did not move and the trackers keep their
    // generations, so the next point still covers every change.
    spdlog::error("restore point {}/{}: cannot record it: {}", rec.collection, rec.name,
                  s.ToString());
    err = JobError{"MetadataCommitFailed",
                   "recording the restore point in the metadata database failed: " + s.message()};
    // Its manifest first, as a delete does: the region never describes a
    // point whose store points are gone.
    if (st) (void)st->remove_manifest(ManifestName(rec.collection, rec.name));
    for (auto& d : rec.disk_restore_points) {
      if (d.store_point && st) (void)st->delete_point(d.store_point);
      d.store_point = 0;
      d.status = "Failed";
    }
    rec.provisioning_state = "Failed";
    rec.error_code = err->code;
    rec.error_message = err->message;
    EndOperation(op, &*err, NowRfc3339());
    s = save_point_retrying_locked(rec, &op, nullptr);
  }
  if (!s.ok()) {
    freed.clear();  // the old bases are still the bases
    spdlog::error("restore point {}/{}: cannot record its end ({}): {}", rec.collection, rec.name,
                  rec.provisioning_state, s.ToString());
    unrecorded_[rec.collection + "/" + rec.name] = {rec, op};
  } else if (!err) {
    // Only now may the trackers forget: a crash before this leaves their
    // generations in place and the next point copies a superset (harmless).
    // Through the oldest generation another collection of the VM still needs.
    for (auto& [disk, gen] : to_retire) retire_needed_locked(*disk, gen);
    uint64_t stored = 0;
    for (const auto& d : rec.disk_restore_points) stored += d.bytes_stored;
    spdlog::info("restore point {}/{}: succeeded, {} new bytes stored", rec.collection, rec.name,
                 stored);
  }
  end_job_locked(rec.collection + "/" + rec.name);
  creating_vms_.erase(vm);
  lock.unlock();
  // A Failed point's packs (sealed by its writers, or by the commits of disk
  // points since deleted) hold nothing a point names, except what other
  // points share with them, which GC's marking keeps: collect them now, not
  // at some later GC. A crash first leaves them to the next GC, as any
  // garbage (staging files are unnamed and went with the point's job).
  if (err && st) request_gc(region);
  // The replaced retained bases are unnamed now (a crash here: Open deletes them).
  free_store_points(freed);
}

Status RestoreServiceImpl::save_point_retrying_locked(const RestorePointRecord& rec,
                                                      const OperationRecord* op,
                                                      const std::vector<TrackingBase>* bases) {
  constexpr int kAttempts = 3;
  Status s;
  for (int attempt = 1; attempt <= kAttempts; ++attempt) {
    s = db_->save_point(rec, op, bases);
    if (s.ok() || attempt == kAttempts) break;
    spdlog::warn("restore point {}/{}: recording it: {}; retrying", rec.collection, rec.name,
                 s.ToString());
    std::this_thread::sleep_for(std::chrono::milliseconds(20 * attempt));
  }
  return s;
}

void RestoreServiceImpl::record_unrecorded_locked() {
  for (auto it = unrecorded_.begin(); it != unrecorded_.end();) {
    if (db_->save_point(it->second.first, &it->second.second).ok()) {
      spdlog::info("restore point {}: its end ({}) is recorded now", it->first,
                   it->second.first.provisioning_state);
      it = unrecorded_.erase(it);
    } else {
      ++it;
    }
  }
}

std::optional<JobError> RestoreServiceImpl::create_point(
    RestorePointRecord& rec, const std::string& vm, const std::string& region, PointProgress& prog,
    std::vector<std::pair<std::shared_ptr<FileDisk>, uint64_t>>* to_retire) {
  auto st = store_of(region);
  if (!st) return JobError{"RegionUnavailable", no_store(region).message()};
  const size_t n = rec.disk_restore_points.size();

  // Which disks can be incremental: their tracking base is of this
  // collection, either a Succeeded point that still names the store point or
  // a base retained when its point was deleted, and the store point exists
  // with the same chunk size. Everything else is forced full (the tracker may
  // have retired generations against a base this collection cannot use).
  std::vector<std::shared_ptr<FileDisk>> fdisks;
  std::vector<bool> force_full(n, true);
  std::vector<uint64_t> parent(n, 0);
  // Per disk: the generation this collection's previous point captured
  // through; the point copies what changed after it (other collections of
  // the VM may have captured more, or less).
  std::vector<uint64_t> since(n, 0);
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
      auto b = db_->tracking_base(d.disk, rec.collection);
      if (b.ok() && b.value()) {
        base = b.value();
        auto bp = db_->get_point(base->collection, base->restore_point);
        if (bp.ok() && bp.value()) base_point = bp.value();
      }
    }
    if (!base || base->granularity != fd->tracker()->granularity()) continue;
    // Recorded against another tracker (a disk recreated under this name):
    // its generation numbers mean nothing to this one.
    if (base->tracker_id != 0 && base->tracker_id != fd->tracker()->id()) continue;
    bool named = base->retained;
    if (!named && base_point && base_point->provisioning_state == "Succeeded") {
      for (const auto& bd : base_point->disk_restore_points) {
        named |= bd.disk == d.disk && bd.store_point == base->store_point;
      }
    }
    if (!named) continue;
    auto info = st->point(base->store_point);
    if (!info.ok() || info->chunk_size != fd->tracker()->granularity() || info->size > fd->size()) {
      continue;
    }
    // The base must be the store point written for that disk restore point: a
    // damaged row naming another one would make this point's unchanged blocks
    // another point's (OpenDiskPoint has the same rule for reads).
    if (!info->tag.empty() &&
        info->tag != DiskPointId(base->collection, base->restore_point, d.disk)) {
      spdlog::error(
          "restore point {}/{}: disk {}: its tracking base names store point {}, which was "
          "written for {} (metadata.db damaged?); full point",
          rec.collection, rec.name, d.disk, base->store_point, info->tag);
      continue;
    }
    force_full[i] = false;
    parent[i] = base->store_point;
    since[i] = base->generation;
  }

  // Blocks whose chunk in the parent was found damaged (quarantined) are
  // copied again from the disk even if unchanged: that stores a fresh copy and
  // heals every point naming it. Known before the cut, so copy-before-write
  // protects them like changed blocks. A parent with an unreadable page
  // cannot say which blocks it lost: that disk is forced full.
  std::vector<std::shared_ptr<const SparseBitmap>> also_copy(n);
  for (size_t i = 0; i < n; ++i) {
    if (force_full[i]) continue;
    const std::string& disk = rec.disk_restore_points[i].disk;
    auto bad = st->damaged_slots(parent[i]);
    if (!bad.ok()) {
      spdlog::warn("restore point {}/{}: disk {}: base store point {} is damaged ({}); full point",
                   rec.collection, rec.name, disk, parent[i], bad.status().message());
      force_full[i] = true;
      parent[i] = 0;
      continue;
    }
    if (bad->empty()) continue;
    auto bits = std::make_shared<SparseBitmap>(bad->back() + 1);
    for (uint64_t slot : *bad) bits->set(slot);
    spdlog::warn("restore point {}/{}: disk {}: re-copying {} block(s) damaged in store point {}",
                 rec.collection, rec.name, disk, bad->size(), parent[i]);
    also_copy[i] = std::move(bits);
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
  // From the first cut on, every disk may have a snapshot to end, whatever happens.
  struct EndSnapshots {
    std::vector<std::shared_ptr<FileDisk>>& disks;
    ~EndSnapshots() {
      for (auto& d : disks) d->end_snapshot();
    }
  } end_snapshots{fdisks};
  std::optional<CutResult> cut;
  // Writers begin right after the cut: begin_point pins each parent, so a
  // parent that survives until then survives the copy. One that vanished
  // since the choice above (its base was released: the disk left the VM)
  // cannot be fixed up, since an incremental snapshot does not protect the
  // unchanged blocks; those disks are cut again, forced full. Each retry makes
  // at least one more disk full, so this ends.
  std::vector<std::unique_ptr<store::PointWriter>> writers(n);
  for (;;) {
    if (fs) {
      env["RPOINT_PHASE"] = "freeze";
      HookResult r = RunHook(hooks.freeze, env, options_.hook_timeout_seconds);
      if (!r.ran || r.timed_out || r.exit_status != 0) {
        thaw();
        return JobError{"FreezeFailed", DescribeHookFailure("freeze", hooks.freeze, r)};
      }
    }
    auto c = CutDisks(fdisks, options_.staging_dir, PointId(rec.collection, rec.name), force_full,
                      also_copy, since);
    if (fs) thaw();
    if (!c.ok()) return JobError{"CutFailed", c.status().message()};
    cut = std::move(c).value();
    bool vanished = false;
    for (size_t i = 0; i < n; ++i) {
      DiskSnapshot& snap = *cut->snapshots[i];
      store::PointParams pp;
      pp.parent = snap.full() ? 0 : parent[i];
      pp.size = snap.size();
      pp.chunk_size = snap.granularity();
      pp.tag = DiskPointId(rec.collection, rec.name, rec.disk_restore_points[i].disk);
      auto w = st->begin_point(pp);
      if (w.ok()) {
        writers[i] = std::move(w).value();
      } else if (pp.parent != 0 && w.status().code() == Code::kNotFound) {
        spdlog::warn(
            "restore point {}/{}: disk {}: parent store point {} is gone; cutting again, "
            "full for this disk",
            rec.collection, rec.name, rec.disk_restore_points[i].disk, parent[i]);
        force_full[i] = true;
        parent[i] = 0;
        vanished = true;
      } else {
        rec.disk_restore_points[i].status = "Failed";
        return JobError{"CopyFailed",
                        "disk '" + rec.disk_restore_points[i].disk + "': " + w.status().message()};
      }
    }
    if (!vanished) break;
    for (auto& w : writers) {
      if (w) w->abandon();
      w.reset();
    }
    for (auto& d : fdisks) d->end_snapshot();
    cut.reset();
  }
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
    auto info = copy_disk(*writers[i], *snaps[i], prog.to_copy[i], prog.copied[i]);
    writers[i].reset();
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

  // The copier read what the disks' page caches held (an O_DIRECT read
  // writes dirty pages back first, but does not flush the device's cache),
  // and retiring a generation forgets its changes: unless what was copied is
  // durable on the disks first, a power loss could revert a block that this point and every
  // later incremental point keep. A sync that fails fails the point, and the
  // generations stay (the next point copies those blocks again).
  for (size_t i = 0; i < n; ++i) {
    Status s = fdisks[i]->sync();
    if (!s.ok()) {
      return JobError{"SyncFailed", "disk '" + rec.disk_restore_points[i].disk +
                                        "': making the copied data durable: " + s.message()};
    }
  }

  // The snapshots end (EndSnapshots) before run_create_point records the
  // point and retires the trackers. Retiring waits for writes still in flight
  // from before the cut (a slow disk); wait for them here, without mu_, so the
  // control API answers meanwhile. A disk whose writes are still stuck keeps
  // its generations: the next point copies a superset of its changes.
  for (size_t i = 0; i < n; ++i) {
    uint64_t gen = snaps[i]->generation();
    if (fdisks[i]->tracker()->wait_writes_left(gen, kRetireWait)) {
      to_retire->emplace_back(fdisks[i], gen);
    } else {
      spdlog::warn(
          "restore point {}/{}: disk {}: writes from before the cut still in flight "
          "after {} s; its tracked changes stay for the next point",
          rec.collection, rec.name, fdisks[i]->name(), kRetireWait.count() / 1000);
    }
  }
  return std::nullopt;
}

Result<store::PointInfo> RestoreServiceImpl::copy_disk(store::PointWriter& w, DiskSnapshot& snap,
                                                       std::atomic<uint64_t>& to_copy,
                                                       std::atomic<uint64_t>& copied) {
  auto bits = snap.to_copy();
  if (!bits.ok()) {
    w.abandon();
    return bits.status();
  }
  to_copy.store(bits->count());

  // Each worker takes the next batch of up to kBatch changed blocks (set
  // bits in disk order: the walk costs the changed blocks, never the disk),
  // reads each run of adjacent blocks in it with one read and hands the batch
  // to the writer in one put_many: one index lookup and one critical section
  // per batch. Hashing runs outside the writer's lock, so the workers hash on
  // every core.
  constexpr size_t kBatch = 16;
  // The disk opened with O_DIRECT: runs are read from the device straight
  // into the worker's buffer, with no copy through the page cache and no
  // page cache filled with a whole disk nobody reads again (that copy and
  // its reclaim were the largest CPU cost of a full point after hashing).
  // While the guest is busy on a buffered disk the snapshot reads the runs
  // buffered all the same (read_blocks: an O_DIRECT read would hold the
  // inode lock against the guest's writes while it waits for writeback).
  // Where O_DIRECT is refused (tmpfs), the snapshot reads buffered, helped by
  // readahead hints on a descriptor of our own: the kernel reads the runs
  // about to be copied in large requests at once, instead of discovering
  // them 64 KiB at a time. Only blocks to copy, so an incremental point still
  // reads only its change.
  UniqueFd direct, hint;
  if (auto rec = disks_.get(snap.disk_name()); rec.ok()) {
    direct.reset(::open(rec->path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
    if (!direct) hint.reset(::open(rec->path.c_str(), O_RDONLY | O_CLOEXEC));
  }
  // The hints run ahead of the copy by a window of kAheadBytes of blocks to
  // copy (read N+1 while hashing and writing N): a worker finds its batch in
  // the page cache instead of waiting for the disk, also when the changed
  // blocks are scattered runs the kernel's own readahead cannot guess.
  constexpr uint64_t kAheadBytes = 16ull << 20;
  const uint64_t ahead_blocks = std::max<uint64_t>(kBatch, kAheadBytes / snap.granularity());
  std::mutex mu;
  uint64_t cursor = 0;
  uint64_t ahead_cursor = 0;  // blocks before it have been hinted
  uint64_t taken = 0, hinted = 0;
  Status failure;
  auto work = [&] {
    const size_t g = snap.granularity();
    // 4 KiB aligned for O_DIRECT.
    std::unique_ptr<char, decltype(&std::free)> mem(
        static_cast<char*>(std::aligned_alloc(4096, g * kBatch)), &std::free);
    if (!mem) {
      std::lock_guard<std::mutex> lock(mu);
      if (failure.ok()) failure = Status::Internal("out of memory for the copy buffer");
      return;
    }
    char* const buf = mem.get();
    uint64_t slots[kBatch];
    std::vector<std::pair<uint64_t, uint64_t>> hints;  // [first block, end block)
    for (;;) {
      size_t n = 0;
      hints.clear();
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!failure.ok()) return;
        if (stopping_.load()) {
          failure = Status::Shutdown("daemon stopping");
          return;
        }
        while (n < kBatch) {
          uint64_t b = bits->find_next(cursor);
          if (b >= bits->size()) break;
          slots[n++] = b;
          cursor = b + 1;
        }
        if (n == 0) return;
        taken += n;
        while (hint && hinted < taken + ahead_blocks) {
          uint64_t b = bits->find_next(ahead_cursor);
          if (b >= bits->size()) break;
          if (!hints.empty() && hints.back().second == b) {
            ++hints.back().second;
          } else {
            hints.emplace_back(b, b + 1);
          }
          ahead_cursor = b + 1;
          ++hinted;
        }
      }
      for (const auto& [first, end] : hints) {
        (void)::posix_fadvise(hint.get(), static_cast<off_t>(first * g),
                              static_cast<off_t>((end - first) * g), POSIX_FADV_WILLNEED);
      }
      Status s;
      for (size_t i = 0; i < n && s.ok();) {
        size_t j = i + 1;
        while (j < n && slots[j] == slots[j - 1] + 1) ++j;
        s = snap.read_blocks(slots[i], static_cast<uint32_t>(j - i), buf + i * g, direct.get());
        i = j;
      }
      if (s.ok()) s = w.put_many(slots, n, buf);
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (failure.ok()) failure = s;
        return;
      }
      copied.fetch_add(n);
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

std::optional<JobError> RestoreServiceImpl::write_manifest(store::Store& st,
                                                           const RestorePointRecord& rec) {
  std::optional<CollectionRecord> coll;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto c = db_->get_collection(rec.collection);
    if (c.ok()) coll = c.value();
  }
  Status m =
      coll ? st.put_manifest(ManifestName(rec.collection, rec.name), EncodeManifest(*coll, rec))
           : Status::NotFound("collection '" + rec.collection + "' is gone");
  if (m.ok()) return std::nullopt;
  return JobError{"InternalError", "writing the point's manifest: " + m.message()};
}

}  // namespace rpoint
