// RestoreService: opening (regions, crash recovery), the job threads, VMs,
// collections, reading and deleting restore points, operations. Creating
// points is point_job.cpp; verify and restores restore_jobs.cpp; NBD exports
// point_exports.cpp. docs/restore-points.md has the design.
#include "restore/restore_service.h"

#include <dirent.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <list>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "disks/disk_files.h"
#include "disks/disk_service.h"
#include "engine/change_tracker.h"
#include "engine/file_disk.h"
#include "restore/manifest.h"
#include "restore/peer_client.h"
#include "restore/restore_db.h"
#include "restore/restore_service_impl.h"
#include "store/point_device.h"
#include "store/store.h"

namespace rpoint {

Status ValidateResourceName(const std::string& what, const std::string& name) {
  return DiskService::ValidateName(name, what + " name");
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
  return "/restorePointCollections/" + c + "/restorePoints/" + rp;
}

std::string DiskPointId(const std::string& c, const std::string& rp, const std::string& d) {
  return PointId(c, rp) + "/diskRestorePoints/" + d;
}

Result<std::shared_ptr<store::PointReader>> OpenDiskPoint(store::Store& st, uint64_t store_point,
                                                          const std::string& disk_point_id) {
  auto r = st.open_point(store_point);
  if (!r.ok()) return r.status();
  const std::string& tag = r.value()->info().tag;
  if (!tag.empty() && tag != disk_point_id) {
    return Status::IoError(disk_point_id + ": its record names store point " +
                           std::to_string(store_point) + ", which was written for " + tag +
                           ": the metadata (metadata.db, or the region's manifest) is damaged");
  }
  return r;
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
    if (r.path.empty() && r.peer.empty()) {
      return Status::InvalidArgument("region '" + r.name + "' has no path");
    }
    if (!r.peer.empty() && r.is_default) {
      return Status::InvalidArgument("region '" + r.name +
                                     "' is on a peer and cannot be the default");
    }
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
  regions_ = options_.regions;
  for (auto& r : regions_) r.is_default = r.name == default_region_;
  // One bound on open pack files for every region together.
  auto packs = store::PackCache::Create(options_.open_packs);
  for (const auto& r : options_.regions) {
    if (!r.peer.empty()) {
      // Kept by another host (restore/peer_jobs.cpp): no store here.
      if (!peer_link_) {
        auto link = MakePeerClient(options_.peer_tls_dir, 10000);
        if (!link.ok()) {
          return Status(link.status().code(), "region '" + r.name + "' on peer " + r.peer + ": " +
                                                  link.status().message());
        }
        peer_link_ = std::move(link).value();
      }
      continue;
    }
    // A store that is not there while metadata.db records points in it is
    // not created afresh: it is most likely on a filesystem that is not
    // mounted (or was removed), and an empty store in its place would take
    // new points where the operator will not find them, and hide the old
    // ones. The region stays unavailable; disks and other regions serve.
    if (!store::Store::Exists(r.path)) {
      auto known = points_in_region(r.name);
      if (!known.ok()) return known.status();
      if (known.value() > 0) {
        std::string why = "its store " + r.path + " is missing (no store.db, packs or LOCK), " +
                          "and metadata.db records " + std::to_string(known.value()) +
                          " restore point(s) in it. If it is on a filesystem that is not " +
                          "mounted, mount it and restart rpointd; if its data is gone, delete " +
                          "those restore points (or their collections) and restart to start " +
                          "an empty store";
        spdlog::error("region '{}' is unavailable: {}", r.name, why);
        missing_stores_[r.name] = why;
        continue;
      }
    }
    // A region that cannot be opened (a damaged store.db, EIO, its LOCK held
    // by another daemon) does not stop the daemon: the VMs' disks must serve.
    Status made = MakeDirs(r.path, 0700);
    store::StoreOptions so;
    so.dir = r.path;
    so.pack_cache = packs;
    auto st = made.ok() ? store::Store::Open(so) : Result<std::shared_ptr<store::Store>>(made);
    if (!st.ok()) {
      std::string why = "its store " + r.path + " cannot be opened (" + st.status().ToString() +
                        "); fix that and restart rpointd";
      spdlog::error("region '{}' is unavailable: {}", r.name, why);
      missing_stores_[r.name] = why;
      continue;
    }
    stores_[r.name] = std::move(st).value();
  }
  Status s = MakeDirs(options_.staging_dir, 0700);
  if (s.ok()) s = recover();
  if (!s.ok()) return s;
  resume_copies();
  std::vector<PendingAbort> aborts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    aborts.swap(aborts_to_send_);
  }
  for (auto& a : aborts) {
    spawn([this, a] {
      Status s = tell_peer_abort(a.region, a.collection, a.name, a.abort,
                                 std::chrono::seconds(options_.peer_deadline_seconds));
      if (!s.ok()) {
        spdlog::warn("restore point {}/{}: cannot tell the peer its copy ended: {}", a.collection,
                     a.name, s.ToString());
      } else {
        spdlog::info("restore point {}/{}: the peer was told its copy ended", a.collection, a.name);
      }
    });
  }
  for (const auto& region : gc_at_start_) request_gc(region);
  return Status::Ok();
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
  auto regions = collection_regions_locked();
  if (!regions.ok()) return regions.status();
  std::map<std::string, std::string>& region_of = regions.value();
  std::vector<RestorePointRecord> copies;  // interrupted copies: decided below
  // A point the restart interrupted: Failed, and the disk points a writer
  // committed before the crash (part of no Succeeded point) give their space back.
  auto mark_interrupted = [&](RestorePointRecord& p, const std::string& message) {
    auto st = store_of(region_of[p.collection]);
    if (st) (void)st->remove_manifest(ManifestName(p.collection, p.name));
    for (auto& d : p.disk_restore_points) {
      if (d.store_point && st) (void)st->delete_point(d.store_point);
      d.store_point = 0;
      if (d.status != "Succeeded") d.status = "Failed";
    }
    p.provisioning_state = "Failed";
    p.error_code = "Interrupted";
    p.error_message = message;
  };
  for (auto& p : points.value()) {
    if (p.provisioning_state == "Creating" && !p.source_restore_point.empty()) {
      copies.push_back(p);
    } else if (p.provisioning_state == "Creating") {
      spdlog::warn("restore point {}/{}: daemon restarted during creation; marked Failed",
                   p.collection, p.name);
      mark_interrupted(p, "daemon restarted during creation");
      Status s = db_->save_point(p);
      if (!s.ok()) return s;
    } else if (p.provisioning_state == "Deleting") {
      // A base the delete retained (same transaction as Deleting) stays.
      auto st = store_of(region_of[p.collection]);
      auto retained = db_->retained_bases();
      if (!retained.ok()) return retained.status();
      std::set<uint64_t> keep;
      for (const auto& b : retained.value()) {
        if (b.collection == p.collection) keep.insert(b.store_point);
      }
      if (st) (void)st->remove_manifest(ManifestName(p.collection, p.name));
      for (auto& d : p.disk_restore_points) {
        if (d.store_point && st && !keep.count(d.store_point)) {
          (void)st->delete_point(d.store_point);
        }
      }
      Status s = db_->delete_point(p.collection, p.name);
      if (!s.ok()) return s;
    }
  }
  // After the loop: a source that was being deleted is gone by now.
  std::set<std::string> resumed_ops;
  for (auto& p : copies) {
    std::optional<std::string> blocker;
    // A point being received from a peer (restore/peer_jobs.cpp) has its pull
    // kept beside it: it resumes from its checkpoints and waits for the sender.
    if (store_of(region_of[p.collection]) &&
        std::filesystem::exists(pull_path(p.collection, p.name))) {
      auto pull = load_pull(p.collection, p.name);
      if (pull.ok() && pull->source_restore_point == p.source_restore_point) {
        spdlog::warn(
            "restore point {}/{}: daemon restarted while receiving {} from a peer; resuming",
            p.collection, p.name, p.source_restore_point);
        resumed_ops.insert(p.operation_id);
        receives_to_resume_.emplace_back(p, std::move(pull).value());
        continue;
      }
      blocker = "its pull from the peer is unreadable (" +
                (pull.ok() ? std::string("another source") : pull.status().message()) + ")";
      remove_pull(p.collection, p.name);
    } else {
      blocker = copy_resume_blocker_locked(p);
    }
    if (!blocker) {
      spdlog::warn("restore point {}/{}: daemon restarted during its copy from {}; resuming",
                   p.collection, p.name, p.source_restore_point);
      resumed_ops.insert(p.operation_id);
      copies_to_resume_.push_back(p);
      continue;
    }
    spdlog::warn("restore point {}/{}: daemon restarted during its copy, which cannot resume: {}",
                 p.collection, p.name, *blocker);
    mark_interrupted(p, "daemon restarted during the copy, which cannot resume: " + *blocker);
    if (peer_region(region_of[p.collection])) {
      // The peer's half would wait out its deadline for data that cannot come.
      aborts_to_send_.push_back(
          {region_of[p.collection], p.collection, p.name,
           PeerAbort{p.source_restore_point, p.error_code, p.error_message, false}});
    }
    auto op = db_->get_operation(p.operation_id);
    if (op.ok() && op.value() && op.value()->status == "InProgress") {
      JobError err{p.error_code, p.error_message};
      EndOperation(*op.value(), &err, now);
      Status s = db_->save_point(p, &*op.value());
      if (!s.ok()) return s;
    } else {
      Status s = db_->save_point(p);
      if (!s.ok()) return s;
    }
  }
  Status s = db_->fail_in_progress_operations("daemon restarted while the operation was running",
                                              now, resumed_ops);
  if (!s.ok()) return s;
  prune_operations_locked();

  // Retained bases whose disk left the VM (or was deleted) while the daemon
  // was down, or between a VM change and its sweep: their store points are
  // no longer named below, so the next loop deletes them.
  (void)sweep_retained_locked();

  // Points a region holds (its manifests) that this metadata.db does not know:
  // a lost or fresh metadata.db, or a region copied from another host.
  std::set<std::string> imported_collections;
  for (const auto& r : regions_) {
    if (!r.peer.empty()) continue;                // its manifests are on the peer
    if (missing_stores_.count(r.name)) continue;  // unavailable: nothing to import
    auto imp = import_manifests_locked(r.name, &imported_collections);
    if (!imp.ok()) return imp.status();
  }
  // Succeeded points without a manifest (made before regions kept them):
  // write it now, so the region is portable from here on.
  {
    auto all = db_->list_points("");
    if (!all.ok()) return all.status();
    std::map<std::string, std::set<std::string>> have;  // region -> manifest names
    for (const auto& [region, st] : stores_) {
      auto ms = st->manifests();
      if (!ms.ok()) return ms.status();
      for (const auto& [name, text] : ms.value()) have[region].insert(name);
    }
    for (const auto& p : all.value()) {
      if (p.provisioning_state != "Succeeded") continue;
      auto c = db_->get_collection(p.collection);
      if (!c.ok() || !c.value()) continue;
      auto st = store_of(c.value()->region);
      std::string name = ManifestName(p.collection, p.name);
      if (!st || have[c.value()->region].count(name)) continue;
      Status m = st->put_manifest(name, EncodeManifest(*c.value(), p));
      if (!m.ok()) spdlog::warn("restore point {}/{}: {}", p.collection, p.name, m.ToString());
    }
  }

  // Store points no record names. Deleted only when they are provably this
  // daemon's own leftovers (unnamed_store_points_locked); anything else may be
  // someone's data the metadata does not know, and waits for an operator's
  // `rpoint region gc NAME --orphans`.
  for (const auto& [region, st] : stores_) {
    auto unnamed = unnamed_store_points_locked(region, imported_collections);
    if (!unnamed.ok()) return unnamed.status();
    size_t dropped = 0, kept = 0;
    for (const auto& [sp, leftover] : unnamed.value()) {
      if (!leftover) {
        ++kept;
        continue;
      }
      spdlog::warn(
          "region {}: deleting store point {} ({}): left by a point that failed or was "
          "deleted",
          region, sp.id, sp.tag);
      if (st->delete_point(sp.id).ok()) ++dropped;
    }
    if (kept) {
      spdlog::warn(
          "region {}: {} store point(s) no restore point names are kept; "
          "`rpoint region gc {} --orphans` deletes them",
          region, kept, region);
    }
    if (dropped) gc_at_start_.push_back(region);
  }
  return Status::Ok();
}

Result<std::map<std::string, std::string>> RestoreServiceImpl::collection_regions_locked() {
  auto colls = db_->list_collections();
  if (!colls.ok()) return colls.status();
  std::map<std::string, std::string> region_of;
  for (const auto& c : colls.value()) region_of[c.name] = c.region;
  return region_of;
}

Result<std::vector<std::pair<store::PointInfo, bool>>>
RestoreServiceImpl::unnamed_store_points_locked(const std::string& region,
                                                const std::set<std::string>& imported) {
  auto st = store_of(region);
  if (!st) return no_store(region);
  auto regions = collection_regions_locked();
  if (!regions.ok()) return regions.status();
  std::map<std::string, std::string>& region_of = regions.value();
  auto points = db_->list_points("");
  if (!points.ok()) return points.status();
  std::set<uint64_t> named;
  std::map<std::string, std::string> state;  // "c/rp" -> provisioning state
  for (const auto& p : points.value()) {
    state[p.collection + "/" + p.name] = p.provisioning_state;
    if (region_of[p.collection] != region) continue;
    for (const auto& d : p.disk_restore_points) {
      if (d.store_point) named.insert(d.store_point);
    }
  }
  auto retained = db_->retained_bases();
  if (!retained.ok()) return retained.status();
  for (const auto& b : retained.value()) {
    if (region_of[b.collection] == region) named.insert(b.store_point);
  }
  std::set<std::string> manifests;
  auto ms = st->manifests();
  if (!ms.ok()) return ms.status();
  for (const auto& [name, text] : ms.value()) manifests.insert(name);
  auto sps = st->list_points();
  if (!sps.ok()) return sps.status();
  std::vector<std::pair<store::PointInfo, bool>> out;
  for (const auto& sp : sps.value()) {
    if (named.count(sp.id)) continue;
    // Tag = /restorePointCollections/c/restorePoints/rp/diskRestorePoints/d.
    // Ours to delete: a collection this metadata.db already had in this
    // region, whose point rp failed (the job committed it, then failed or
    // was interrupted) or is gone from both metadata.db and the region's
    // manifests (deleted; a released tracking base).
    bool leftover = false;
    auto parts = Split(sp.tag, '/');
    if (parts.size() == 7 && parts[1] == "restorePointCollections" && parts[3] == "restorePoints" &&
        parts[5] == "diskRestorePoints" && region_of.count(parts[2]) &&
        region_of[parts[2]] == region && !imported.count(parts[2])) {
      auto it = state.find(parts[2] + "/" + parts[4]);
      bool in_manifest = manifests.count(ManifestName(parts[2], parts[4])) > 0;
      leftover = (it == state.end() && !in_manifest) ||
                 (it != state.end() && (it->second == "Failed" || it->second == "Deleting"));
    }
    out.emplace_back(sp, leftover);
  }
  return out;
}

Result<std::vector<std::string>> RestoreServiceImpl::import_manifests_locked(
    const std::string& region, std::set<std::string>* imported_collections) {
  auto st = store_of(region);
  if (!st) return no_store(region);
  auto ms = st->manifests();
  if (!ms.ok()) return ms.status();
  std::vector<std::pair<CollectionRecord, RestorePointRecord>> todo;
  for (const auto& [name, text] : ms.value()) {
    auto m = DecodeManifest(text);
    if (!m.ok()) {
      spdlog::error("region {}: manifest {} not imported: {}", region, name, m.status().ToString());
      continue;
    }
    if (ManifestName(m->first.name, m->second.name) != name) {
      spdlog::error("region {}: manifest {} names another point; not imported", region, name);
      continue;
    }
    auto known = db_->get_point(m->first.name, m->second.name);
    if (!known.ok()) return known.status();
    if (known.value()) continue;
    todo.push_back(std::move(m).value());
  }
  // In creation order, so the collection lists them as they were made.
  std::sort(todo.begin(), todo.end(), [](const auto& a, const auto& b) {
    return a.second.time_created < b.second.time_created;
  });
  std::vector<std::string> out;
  for (auto& [c, p] : todo) {
    std::string id = PointId(c.name, p.name);
    Status valid = ValidateResourceName("collection", c.name);
    if (valid.ok()) valid = ValidateResourceName("restore point", p.name);
    if (!valid.ok()) {
      spdlog::error("region {}: {} not imported: {}", region, id, valid.ToString());
      continue;
    }
    auto have = db_->get_collection(c.name);
    if (!have.ok()) return have.status();
    if (have.value() && have.value()->region != region) {
      spdlog::error("region {}: {} not imported: collection {} is in region {}", region, id, c.name,
                    have.value()->region);
      continue;
    }
    if (!have.value()) {
      // Attached by name to its VM: the VM of that name here, if any (a
      // collection may outlive its VM, so none is fine too; a VM may have
      // several collections).
      c.region = region;
      Status s = db_->insert_collection(c);
      if (!s.ok()) return s;
      imported_collections->insert(c.name);
      spdlog::warn("region {}: collection {} (VM {}) imported from the region", region, c.name,
                   c.source_vm);
    }
    // Succeeded only if the region still holds every disk point's data.
    for (const auto& d : p.disk_restore_points) {
      if (d.store_point != 0 && st->point(d.store_point).ok()) continue;
      p.provisioning_state = "Failed";
      p.error_code = "Incomplete";
      p.error_message = "imported from region " + region + ": disk '" + d.disk + "': store point " +
                        std::to_string(d.store_point) + " is missing";
    }
    if (p.provisioning_state != "Succeeded") {
      for (auto& d : p.disk_restore_points) {
        if (!st->point(d.store_point).ok()) d.status = "Failed";
      }
    }
    Status s = db_->save_point(p);
    if (!s.ok()) return s;
    spdlog::warn("region {}: restore point {} imported ({})", region, id, p.provisioning_state);
    out.push_back(id);
  }
  return out;
}

Result<nlohmann::json> RestoreServiceImpl::repair_region(const std::string& region) {
  auto st = store_of(region);
  if (!st) return no_store(region);
  auto rep = st->repair();
  if (!rep.ok()) return rep.status();
  std::vector<std::string> imported;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::set<std::string> colls;
    auto imp = import_manifests_locked(region, &colls);
    if (!imp.ok()) return imp.status();
    imported = std::move(imp).value();
  }
  const store::RepairReport& r = rep.value();
  nlohmann::json unreadable = nlohmann::json::array();
  for (const auto& p : r.packs_unreadable) {
    unreadable.push_back({{"pack", p.pack}, {"reason", p.reason}});
  }
  spdlog::info(
      "region {}: repair: {} pack(s) re-indexed, {} point(s) and {} restore point(s) "
      "imported",
      region, r.packs_indexed, r.points_imported, imported.size());
  return nlohmann::json{{"region", region},
                        {"packs", r.packs_on_disk},
                        {"packsIndexed", r.packs_indexed},
                        {"objectsIndexed", r.objects_indexed},
                        {"storePointsImported", r.points_imported},
                        {"pointFilesWritten", r.point_files_written},
                        {"storePointsIncomplete", r.points_incomplete},
                        {"packsUnreadable", unreadable},
                        {"packsMissing", r.packs_missing},
                        {"restorePointsImported", imported}};
}

Result<nlohmann::json> RestoreServiceImpl::gc_region(const std::string& region, bool orphans) {
  auto st = store_of(region);
  if (!st) return no_store(region);
  uint64_t dropped = 0;
  if (orphans) {
    std::vector<store::PointInfo> victims;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // A running job's committed disk points are unnamed until it ends.
      auto points = db_->list_points("");
      if (!points.ok()) return points.status();
      auto regions = collection_regions_locked();
      if (!regions.ok()) return regions.status();
      std::map<std::string, std::string>& region_of = regions.value();
      for (const auto& p : points.value()) {
        if (p.provisioning_state == "Creating" && region_of[p.collection] == region) {
          return Status::Conflict("restore point " + PointId(p.collection, p.name) +
                                  " is being created in region '" + region + "'; retry later");
        }
      }
      auto unnamed = unnamed_store_points_locked(region, {});
      if (!unnamed.ok()) return unnamed.status();
      for (auto& [sp, leftover] : unnamed.value()) victims.push_back(sp);
      // Deleted under mu_, so no point job can start and name one meanwhile.
      for (const auto& sp : victims) {
        Status s = st->delete_point(sp.id);
        if (!s.ok() && s.code() != Code::kNotFound) return s;
        spdlog::warn(
            "region {}: deleted store point {} ({}): no restore point names it "
            "(operator request)",
            region, sp.id, sp.tag);
        ++dropped;
      }
    }
  }
  {
    std::lock_guard<std::mutex> lock(gc_mu_);
    if (gc_holds_[region] > 0) {
      // hold_gc: a resumed receive has not yet named what it checkpointed.
      return Status::Conflict("a copy received from a peer is resuming in region '" + region +
                              "'; retry in a moment");
    }
  }
  auto g = st->collect_garbage();
  if (!g.ok()) return g.status();
  store::OrphanReport o;
  if (orphans) {
    auto r = st->delete_unindexed_packs();
    if (!r.ok()) return r.status();
    o = r.value();
  }
  return nlohmann::json{{"region", region},
                        {"orphans", orphans},
                        {"storePointsDeleted", dropped},
                        {"objectsDeleted", g->objects_deleted},
                        {"packsDeleted", g->packs_deleted + o.packs_deleted},
                        {"packsRepacked", g->packs_repacked},
                        {"unindexedPacksDeleted", o.packs_deleted},
                        {"packBytesBefore", g->pack_bytes_before},
                        {"packBytesAfter", g->pack_bytes_after},
                        {"unindexedBytesFreed", o.bytes_freed}};
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
  wake_naps();
  std::list<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    jobs.swap(jobs_);
  }
  for (auto& j : jobs) j.thread.join();
}

std::shared_ptr<store::Store> RestoreServiceImpl::store_of(const std::string& region) {
  auto it = stores_.find(region);
  if (it == stores_.end()) return nullptr;
  Status present = it->second->check_present();
  if (present.ok()) return it->second;
  std::lock_guard<std::mutex> lock(lost_mu_);
  if (lost_logged_.insert(region).second) {
    spdlog::error("region '{}' is unavailable: {}", region, present.message());
  }
  return nullptr;
}

Status RestoreServiceImpl::region_status(const std::string& region) {
  if (peer_region(region)) return Status::Ok();
  return store_of(region) ? Status::Ok() : no_store(region);
}

Status RestoreServiceImpl::no_store(const std::string& region) {
  if (auto m = missing_stores_.find(region); m != missing_stores_.end()) {
    return Status::Unavailable("region '" + region + "' is unavailable: " + m->second);
  }
  if (auto it = stores_.find(region); it != stores_.end()) {
    Status present = it->second->check_present();
    if (!present.ok()) {
      return Status::Unavailable("region '" + region + "' is unavailable: " + present.message() +
                                 "; its restore points cannot be read or made until it is " +
                                 "back and rpointd restarts");
    }
    // Never Ok: callers return this as their error.
    return Status::Unavailable("region '" + region + "' was unavailable a moment ago; retry");
  }
  if (peer_region(region)) {
    return Status::Conflict("region '" + region + "' is kept on peer " + peer_region(region)->peer +
                            ": use that host's API");
  }
  return Status::NotFound("region '" + region + "' is not configured");
}

Result<size_t> RestoreServiceImpl::points_in_region(const std::string& region) {
  std::lock_guard<std::mutex> lock(mu_);
  auto regions = collection_regions_locked();
  if (!regions.ok()) return regions.status();
  auto points = db_->list_points("");
  if (!points.ok()) return points.status();
  size_t n = 0;
  for (const auto& p : points.value()) {
    if (regions.value()[p.collection] != region) continue;
    for (const auto& d : p.disk_restore_points) {
      if (d.store_point) {
        ++n;
        break;
      }
    }
  }
  return n;
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
  EndOperation(op, err, NowRfc3339());
  op.result = std::move(result);
  std::lock_guard<std::mutex> lock(mu_);
  Status s = db_->save_operation(op);
  if (!s.ok()) spdlog::error("operation {}: cannot record its end: {}", op.id, s.ToString());
  live_ops_.erase(op.id);
  prune_operations_locked();
}

std::vector<RestoreServiceImpl::StoreRef> RestoreServiceImpl::sweep_retained_locked() {
  std::vector<StoreRef> out;
  Status stale = db_->drop_stale_bases();
  if (!stale.ok()) spdlog::warn("tracking bases: {}", stale.ToString());
  auto bases = db_->retained_bases();
  if (!bases.ok()) {
    spdlog::warn("retained bases: {}", bases.status().ToString());
    return out;
  }
  for (const auto& b : bases.value()) {
    auto c = db_->get_collection(b.collection);
    auto vm = db_->vm_of_disk(b.disk);
    if (!c.ok() || !vm.ok()) continue;  // a read error keeps it; the next sweep decides
    if (c.value() && vm.value() && *vm.value() == c.value()->source_vm && disks_.get(b.disk).ok()) {
      continue;  // still the base of a disk the collection's VM has
    }
    Status s = db_->drop_retained_base(b.disk, b.store_point);
    if (!s.ok()) {
      spdlog::warn("disk {}: releasing retained base: {}", b.disk, s.ToString());
      continue;
    }
    spdlog::info("disk {}: released the retained base (store point {} of deleted {}/{})", b.disk,
                 b.store_point, b.collection, b.restore_point);
    // Collection gone: its region is unknown here; Open deletes the unnamed point.
    if (c.value()) out.push_back({c.value()->region, b.store_point});
  }
  return out;
}

void RestoreServiceImpl::retire_needed_locked(FileDisk& disk, uint64_t limit) {
  ChangeTracker& t = *disk.tracker();
  auto bases = db_->bases_of_disk(disk.name());
  if (!bases.ok()) {
    spdlog::warn("disk {}: tracking bases: {}", disk.name(), bases.status().ToString());
    return;
  }
  // The oldest generation a collection still needs; none needed: every
  // frozen one may go (a collection without a base starts with a full point).
  uint64_t through = t.epoch() - 1;
  for (const auto& b : bases.value()) {
    if (b.tracker_id == 0 || b.tracker_id == t.id()) through = std::min(through, b.generation);
  }
  through = std::min(through, limit);
  // Called even when nothing is old enough to drop: retiring also records
  // that a point succeeded (the tracker is no longer "all since creation").
  // Never waits here (the service lock is held): writes of a generation a
  // point still needs to retire are waited for by its job first; if some are
  // in flight still, the next point's end retires.
  if (!t.wait_writes_left(through, std::chrono::milliseconds(0))) return;
  Status r = t.retire_through(through);
  if (!r.ok()) {
    spdlog::warn("disk {}: retiring tracked changes: {}", disk.name(), r.ToString());
  }
}

void RestoreServiceImpl::free_store_points(const std::vector<StoreRef>& refs) {
  std::set<std::string> regions;
  for (const auto& r : refs) {
    auto st = store_of(r.region);
    if (!st) continue;
    Status s = st->delete_point(r.id);
    if (!s.ok() && s.code() != Code::kNotFound) {
      spdlog::warn("region {}: deleting store point {}: {}", r.region, r.id, s.ToString());
    }
    regions.insert(r.region);
  }
  for (const auto& region : regions) request_gc(region);
}

void RestoreServiceImpl::request_gc(const std::string& region) {
  {
    std::lock_guard<std::mutex> lock(gc_mu_);
    if (gc_holds_[region] > 0) {
      gc_deferred_.insert(region);  // release_gc runs it
      return;
    }
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

void RestoreServiceImpl::hold_gc(const std::string& region) {
  std::lock_guard<std::mutex> lock(gc_mu_);
  ++gc_holds_[region];
}

void RestoreServiceImpl::release_gc(const std::string& region) {
  {
    std::lock_guard<std::mutex> lock(gc_mu_);
    if (--gc_holds_[region] > 0 || !gc_deferred_.erase(region)) return;
  }
  request_gc(region);
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
  std::unique_lock<std::mutex> lock(mu_);
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
  // A disk that left the VM no longer needs a retained base.
  std::vector<StoreRef> freed = sweep_retained_locked();
  lock.unlock();
  free_store_points(freed);
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
  std::unique_lock<std::mutex> lock(mu_);
  Status s = db_->delete_vm(name);
  if (!s.ok()) return s;
  spdlog::info("vm {}: deleted (its collections stay)", name);
  std::vector<StoreRef> freed = sweep_retained_locked();  // its disks left it
  lock.unlock();
  free_store_points(freed);
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
  if (const RegionSpec* peer = peer_region(region)) {
    // The peer keeps it first, so a collection listed here always exists there.
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto vm = db_->get_vm(source_vm);
      if (!vm.ok()) return vm.status();
      if (!vm.value()) return Status::NotFound("VM '" + source_vm + "' not found");
    }
    auto r = peer_link_->call(peer->peer, "PUT", "/peer/v1/restorePointCollections/" + name,
                              {{"sourceVm", source_vm}, {"region", peer->peer_region}});
    if (!r.ok()) {
      return Status(r.status().code(),
                    "region '" + region + "' on peer " + peer->peer + ": " + r.status().message());
    }
  }
  return insert_collection(name, source_vm, region, true);
}

Result<std::pair<CollectionRecord, bool>> RestoreServiceImpl::insert_collection(
    const std::string& name, const std::string& source_vm, const std::string& region,
    bool vm_here) {
  if (missing_stores_.count(region)) return no_store(region);
  if (!stores_.count(region) && !peer_region(region)) {
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
  if (vm_here) {
    auto vm = db_->get_vm(source_vm);
    if (!vm.ok()) return vm.status();
    if (!vm.value()) return Status::NotFound("VM '" + source_vm + "' not found");
  }
  // A VM may have several collections (one per region, as Azure's copy
  // flow needs): each tracks its own base per disk (restore/restore_db.h).
  CollectionRecord c;
  c.name = name;
  c.source_vm = source_vm;
  c.region = region;
  c.time_created = NowRfc3339();
  Status s = db_->insert_collection(c);
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
  std::string region, source_vm;
  {
    std::unique_lock<std::mutex> lock(mu_);
    auto c = db_->get_collection(name);
    if (!c.ok()) return c.status();
    if (!c.value()) return Status::NotFound("collection '" + name + "' not found");
    if (deleting_collections_.count(name)) {
      return Status::Conflict("collection '" + name + "' is being deleted");
    }
    region = c.value()->region;
    source_vm = c.value()->source_vm;
    auto ps = db_->list_points(name);
    if (!ps.ok()) return ps.status();
    // A point being cut, or one another copy is reading, refuses the whole
    // delete before any copy into the collection is canceled.
    for (const auto& p : ps.value()) {
      if (p.provisioning_state == "Creating") {
        if (!p.source_restore_point.empty()) continue;  // a copy: canceled below
        return Status::Conflict("restore point '" + p.name + "' of collection '" + name +
                                "' is being created");
      }
      if (Status busy = refuse_if_copy_source_locked(name, p.name); !busy.ok()) return busy;
    }
    // Copies into it are canceled (each waited for); a point being cut is Conflict.
    for (const auto& p : ps.value()) {
      if (p.provisioning_state != "Creating") continue;
      Status s = cancel_copy_locked(lock, name, p.name);
      if (!s.ok()) return s;
    }
    if (deleting_collections_.count(name)) {  // mu_ was released while waiting
      return Status::Conflict("collection '" + name + "' is being deleted");
    }
    ps = db_->list_points(name);
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
  std::vector<StoreRef> freed;  // retained bases of the collection: its rows go with it
  {
    std::lock_guard<std::mutex> lock(mu_);
    deleting_collections_.erase(name);
    auto retained = db_->retained_bases();
    if (!retained.ok()) return retained.status();
    for (const auto& b : retained.value()) {
      if (b.collection == name) freed.push_back({region, b.store_point});
    }
    auto vm = db_->get_vm(source_vm);
    Status s = db_->delete_collection(name);
    if (!s.ok()) return s;
    // Its bases are gone: the generations only it still needed retire now.
    if (vm.ok() && vm.value()) {
      for (const auto& d : vm.value()->disks) {
        if (auto fd = disks_.file_disk(d); fd && fd->tracker()) retire_needed_locked(*fd);
      }
    }
  }
  spdlog::info("collection {}: deleted with {} restore point(s)", name, points.size());
  free_store_points(freed);
  if (!points.empty()) request_gc(region);
  return Status::Ok();
}

Result<RestorePointRecord> RestoreServiceImpl::get_restore_point(const std::string& collection,
                                                                 const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto found = find_point_locked(collection, name);
  if (!found.ok()) return found.status();
  RestorePointRecord r = std::move(found.value().point);
  overlay(r);
  return r;
}

Result<RestoreServiceImpl::FoundPoint> RestoreServiceImpl::find_point_locked(
    const std::string& collection, const std::string& name) {
  auto c = db_->get_collection(collection);
  if (!c.ok()) return c.status();
  if (!c.value()) return Status::NotFound("collection '" + collection + "' not found");
  auto p = db_->get_point(collection, name);
  if (!p.ok()) return p.status();
  if (!p.value()) {
    return Status::NotFound("restore point '" + name + "' not found in collection '" + collection +
                            "'");
  }
  return FoundPoint{c.value()->region, *p.value()};
}

Result<CollectionRecord> RestoreServiceImpl::collection_for_new_point_locked(
    const std::string& collection) {
  auto c = db_->get_collection(collection);
  if (!c.ok()) return c.status();
  if (!c.value()) return Status::NotFound("collection '" + collection + "' not found");
  if (deleting_collections_.count(collection)) {
    return Status::Conflict("collection '" + collection + "' is being deleted");
  }
  // A peer region has no store here: its points live on the peer.
  if (!store_of(c.value()->region) && !peer_region(c.value()->region)) {
    Status why = no_store(c.value()->region);
    if (why.code() == Code::kUnavailable) return why;
    return Status::Conflict("collection '" + collection + "' is in region '" + c.value()->region +
                            "', which is no longer configured");
  }
  return *c.value();
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
  // The region's manifest first: from then on a copy of the region no longer
  // lists the point, whatever happens to the rest of the delete.
  if (st) {
    Status m = st->remove_manifest(ManifestName(p.collection, p.name));
    if (!m.ok()) spdlog::warn("restore point {}/{}: {}", p.collection, p.name, m.ToString());
  }
  std::set<uint64_t> keep;  // retained as a disk's tracking base
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto retained = db_->retained_bases();
    if (retained.ok()) {
      for (const auto& b : retained.value()) {
        if (b.collection == p.collection) keep.insert(b.store_point);
      }
    }
  }
  for (const auto& d : p.disk_restore_points) {
    if (!d.store_point || !st || keep.count(d.store_point)) continue;
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

Status RestoreServiceImpl::cancel_copy_locked(std::unique_lock<std::mutex>& lock,
                                              const std::string& collection,
                                              const std::string& name) {
  // A copy (local, or to or from a peer: restore/peer_jobs.cpp) is canceled:
  // its job ends Failed (Canceled), deleting what it wrote, and tells the
  // other host if any; then the point goes as a failed one does. A point
  // being cut runs to its end.
  const std::string key = collection + "/" + name;
  const std::string id = PointId(collection, name);
  bool asked = abort_receive_locked(
      key, JobError{"Canceled", "the copy was canceled: restore point " + id +
                                    " was deleted on this host while it was being received"});
  auto live = live_points_.find(key);
  if (!asked && live != live_points_.end()) {
    auto p = db_->get_point(collection, name);
    if (p.ok() && p.value() && !p.value()->source_restore_point.empty()) {
      live->second->cancel.store(true);
      wake_naps();
      asked = true;
    }
  }
  if (!asked) {
    if (!live_points_.count(key)) return Status::Ok();  // ended meanwhile
    return Status::Conflict("restore point '" + name + "' is being created");
  }
  spdlog::info("restore point {}/{}: deleted while being copied: canceling the copy", collection,
               name);
  if (!wait_job_end_locked(lock, key, std::chrono::seconds(30))) {
    return Status::Conflict("restore point '" + name +
                            "': its copy is being canceled; retry the delete");
  }
  return Status::Ok();
}

Status RestoreServiceImpl::refuse_if_copy_source_locked(const std::string& collection,
                                                        const std::string& name) {
  const std::string id = PointId(collection, name);
  for (const auto& entry : live_points_) {
    const std::string& key = entry.first;
    // A point received from a peer names the sender's point: not this one.
    // A copy being canceled still counts until its job has ended.
    if (receiving_.count(key)) continue;
    auto parts = Split(key, '/');
    if (parts.size() != 2) continue;
    auto p = db_->get_point(parts[0], parts[1]);
    if (!p.ok() || !p.value() || p.value()->provisioning_state != "Creating" ||
        p.value()->source_restore_point != id) {
      continue;
    }
    return Status::Conflict("restore point " + id +
                            " is the source of a copy in progress: " + PointId(parts[0], parts[1]) +
                            " (operation /operations/" + p.value()->operation_id +
                            "); wait for the copy to end, or delete that copy to cancel it, "
                            "then delete the source");
  }
  return Status::Ok();
}

Status RestoreServiceImpl::delete_restore_point(const std::string& collection,
                                                const std::string& name) {
  RestorePointRecord p;
  std::string region;
  {
    std::unique_lock<std::mutex> lock(mu_);
    auto found = find_point_locked(collection, name);
    if (!found.ok()) return found.status();
    region = std::move(found.value().region);
    p = std::move(found.value().point);
    if (p.provisioning_state == "Creating") {
      Status c = cancel_copy_locked(lock, collection, name);
      if (!c.ok()) return c;
      found = find_point_locked(collection, name);
      if (!found.ok()) return found.status();
      p = std::move(found.value().point);
      if (p.provisioning_state == "Creating") {
        return Status::Conflict("restore point '" + name + "' is being created");
      }
    } else if (Status busy = refuse_if_copy_source_locked(collection, name); !busy.ok()) {
      return busy;
    }
    // A disk base among its disk points keeps its store point (retained), so
    // the disk's next point stays incremental.
    auto kept = db_->mark_point_deleting(collection, name);
    if (!kept.ok()) return kept.status();
    p.provisioning_state = "Deleting";
    for (const auto& b : kept.value()) {
      spdlog::info("restore point {}/{}: disk {}: store point {} kept as the tracking base",
                   collection, name, b.disk, b.store_point);
    }
  }
  purge_point(p, region);
  spdlog::info("restore point {}/{}: deleted", collection, name);
  request_gc(region);
  return Status::Ok();
}

Result<OperationRecord> RestoreServiceImpl::get_operation(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto o = db_->get_operation(id);
  if (!o.ok()) return o.status();
  if (!o.value()) return Status::NotFound("operation '" + id + "' not found");
  OperationRecord op = *o.value();
  overlay_live_locked(op);
  return op;
}

Result<std::vector<OperationRecord>> RestoreServiceImpl::list_operations() {
  std::lock_guard<std::mutex> lock(mu_);
  prune_operations_locked();
  auto ops = db_->list_operations();
  if (!ops.ok()) return ops.status();
  for (OperationRecord& op : ops.value()) overlay_live_locked(op);
  return ops;
}

void RestoreServiceImpl::overlay_live_locked(OperationRecord& op) {
  if (op.status != "InProgress") return;
  for (const auto& [key, u] : unrecorded_) {
    if (u.second.id == op.id) {
      op = u.second;
      return;
    }
  }
  auto it = live_ops_.find(op.id);
  if (it != live_ops_.end()) op.percent_complete = it->second->load();
  if (op.kind != "CreateRestorePoint" && op.kind != "CopyRestorePoint") return;
  // resource_id = /restorePointCollections/c/restorePoints/rp
  auto parts = Split(op.resource_id, '/');
  if (parts.size() != 5) return;
  auto lp = live_points_.find(parts[2] + "/" + parts[4]);
  if (lp == live_points_.end()) return;
  uint64_t total = 0, done = 0;
  for (size_t i = 0; i < lp->second->copied.size(); ++i) {
    total += lp->second->to_copy[i].load();
    done += lp->second->copied[i].load();
  }
  op.percent_complete = total ? static_cast<int>(std::min<uint64_t>(99, done * 100 / total)) : 0;
}

void RestoreServiceImpl::prune_operations_locked() {
  auto cutoff =
      std::chrono::system_clock::now() - std::chrono::seconds(options_.operation_retention_seconds);
  auto n = db_->prune_operations(FormatRfc3339(cutoff), options_.operation_max_count);
  if (!n.ok()) {
    spdlog::warn("operations: cannot prune ended ones: {}", n.status().ToString());
  } else if (n.value() > 0) {
    spdlog::debug("operations: pruned {} ended ones", n.value());
  }
}

}  // namespace rpoint
