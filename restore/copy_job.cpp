// Copying a restore point to a collection of the same VM in another region:
// validation, the job (restore/point_copy.h moves the chunks the target region
// lacks), the manifest and the final transaction. A copy is a point like any
// other once Succeeded (exported, restorable, independent of its source);
// while it is Creating nothing can use it, its source cannot be deleted
// (refuse_if_copy_source_locked), and deleting it or its collection cancels
// it (Failed, Canceled; what it wrote deleted). A crash leaves it Creating: Open
// resumes it when its source is still there (chunks already in the target,
// checkpointed every 16 MiB, and disks already committed are not moved
// again), else turns it Failed (its committed store points deleted).
// docs/restore-points.md, *Copies between regions*.
#include <spdlog/spdlog.h>

#include "disks/disk_files.h"
#include "restore/manifest.h"
#include "restore/point_copy.h"
#include "restore/restore_service_impl.h"
#include "store/point_reader.h"

namespace rpoint {

Result<Started<RestorePointRecord>> RestoreServiceImpl::copy_restore_point(
    const std::string& collection, const std::string& name, const std::string& source_collection,
    const std::string& source_name) {
  if (stopping_.load()) return Status::Shutdown("rpointd is stopping");
  Status s = ValidateResourceName("restore point", name);
  if (!s.ok()) return s;
  std::unique_lock<std::mutex> lock(mu_);
  auto coll = collection_for_new_point_locked(collection);
  if (!coll.ok()) return coll.status();
  const std::string region = coll.value().region;
  auto found = find_point_locked(source_collection, source_name);
  if (!found.ok()) return found.status();
  if (Status kept = kept_here(found.value().region, source_collection, source_name); !kept.ok()) {
    return kept;
  }
  RestorePointRecord src = std::move(found.value().point);
  const std::string src_region = found.value().region;
  auto src_coll = db_->get_collection(source_collection);
  if (!src_coll.ok()) return src_coll.status();
  const std::string src_id = PointId(source_collection, source_name);
  if (source_collection == collection) {
    return Status::InvalidArgument("restore point " + src_id + " is already in collection '" +
                                   collection + "'; a copy goes to a collection in another region");
  }
  if (src_region == region) {
    return Status::InvalidArgument("collection '" + collection + "' is in region '" + region +
                                   "', as is the source " + src_id +
                                   "; a copy goes to another region");
  }
  if (src_coll.value()->source_vm != coll.value().source_vm) {
    return Status::Conflict("collection '" + collection + "' is for VM '" + coll.value().source_vm +
                            "', the source " + src_id + " for VM '" + src_coll.value()->source_vm +
                            "'; a copy goes to a collection of the same VM");
  }
  if (src.provisioning_state != "Succeeded") {
    return Status::Conflict("restore point " + src_id + " is " + src.provisioning_state +
                            ", not Succeeded; only a complete point can be copied");
  }
  if (!store_of(src_region)) return no_store(src_region);
  auto existing = db_->get_point(collection, name);
  if (!existing.ok()) return existing.status();
  if (existing.value()) {
    RestorePointRecord p = *existing.value();
    if (p.source_restore_point == src_id && p.provisioning_state != "Deleting") {
      overlay(p);
      std::string op = p.operation_id;
      return Started<RestorePointRecord>{std::move(p), op, false};
    }
    return Status::Conflict("restore point '" + name + "' already exists in collection '" +
                            collection + "'; restore points cannot be updated");
  }

  // The copy describes the same cut: the source's time, mode, excluded disks
  // and VM metadata, with its own disk restore point ids.
  RestorePointRecord rec = src;
  rec.collection = collection;
  rec.name = name;
  rec.provisioning_state = "Creating";
  rec.source_restore_point = src_id;
  rec.error_code.clear();
  rec.error_message.clear();
  for (auto& d : rec.disk_restore_points) {
    d.status = "Pending";
    d.completion_percent = 0;
    d.blocks_to_copy = d.blocks_copied = d.bytes_stored = 0;
    d.store_point = d.parent_store_point = 0;
    d.full = true;  // until the job finds a base in the target collection
  }
  if (rec.source_metadata.contains("storageProfile")) {
    for (auto& j : rec.source_metadata["storageProfile"]["disks"]) {
      if (j.is_object() && j.contains("name") && j["name"].is_string()) {
        j["diskRestorePoint"] = {
            {"id", DiskPointId(collection, name, j["name"].get<std::string>())}};
      }
    }
  }
  OperationRecord op = new_operation("CopyRestorePoint", PointId(collection, name));
  rec.operation_id = op.id;
  s = db_->save_point(rec, &op);
  if (!s.ok()) return s;
  auto prog = std::make_shared<PointProgress>(rec.disk_restore_points.size());
  live_points_[collection + "/" + name] = prog;
  lock.unlock();

  spdlog::info("restore point {}/{}: copying {} from region {} to region {}, operation {}",
               collection, name, src_id, src_region, region, op.id);
  spawn([this, rec, op, src, src_region, region, prog] {
    if (peer_region(region)) {
      run_send_point(rec, op, src, src_region, region, prog);  // restore/peer_jobs.cpp
    } else {
      run_copy_point(rec, op, src, src_region, region, prog);
    }
  });
  return Started<RestorePointRecord>{rec, op.id, true};
}

std::optional<std::string> RestoreServiceImpl::copy_resume_blocker_locked(
    const RestorePointRecord& p) {
  auto parts = Split(p.source_restore_point, '/');  // /restorePointCollections/c/restorePoints/rp
  if (parts.size() != 5) return "its source id " + p.source_restore_point + " is malformed";
  auto coll = db_->get_collection(p.collection);
  if (!coll.ok() || !coll.value()) return std::string("its collection is gone");
  // A copy to a peer region resumes too (run_send_point posts it again; the
  // peer goes on from what it checkpointed).
  if (!peer_region(coll.value()->region) && !store_of(coll.value()->region)) {
    return no_store(coll.value()->region).message();
  }
  auto found = find_point_locked(parts[2], parts[4]);
  if (!found.ok()) {
    return "its source restore point " + p.source_restore_point + " no longer exists (" +
           found.status().message() + ")";
  }
  const RestorePointRecord& src = found.value().point;
  if (src.provisioning_state != "Succeeded") {
    return "its source restore point " + p.source_restore_point + " is " + src.provisioning_state;
  }
  if (!store_of(found.value().region)) {
    return "its source restore point " + p.source_restore_point + ": " +
           no_store(found.value().region).message();
  }
  if (src.disk_restore_points.size() != p.disk_restore_points.size()) {
    return "its source restore point " + p.source_restore_point + " has other disks";
  }
  return std::nullopt;
}

void RestoreServiceImpl::resume_copies() {
  std::vector<RestorePointRecord> copies;
  copies.swap(copies_to_resume_);
  for (auto& rec : copies) {
    std::unique_lock<std::mutex> lock(mu_);
    auto parts = Split(rec.source_restore_point, '/');
    auto found = find_point_locked(parts[2], parts[4]);
    auto coll = db_->get_collection(rec.collection);
    auto op = db_->get_operation(rec.operation_id);
    if (!found.ok() || !coll.ok() || !coll.value() || !op.ok() || !op.value()) {
      // Checked by recover() under this same lock a moment ago.
      spdlog::error("restore point {}/{}: cannot resume its copy", rec.collection, rec.name);
      continue;
    }
    auto prog = std::make_shared<PointProgress>(rec.disk_restore_points.size());
    for (size_t i = 0; i < rec.disk_restore_points.size(); ++i) {
      // The progress the interrupted run recorded, from the first GET on.
      prog->to_copy[i].store(rec.disk_restore_points[i].blocks_to_copy);
      prog->copied[i].store(rec.disk_restore_points[i].blocks_copied);
      prog->started[i].store(rec.disk_restore_points[i].blocks_to_copy > 0);
    }
    live_points_[rec.collection + "/" + rec.name] = prog;
    RestorePointRecord src = found.value().point;
    std::string src_region = found.value().region, region = coll.value()->region;
    OperationRecord o = *op.value();
    if (peer_region(region)) {
      // It shares its source with the peer again: once the sharer is set.
      if (sharer_.load()) {
        spawn([this, rec, o, src, src_region, region, prog] {
          run_send_point(rec, o, src, src_region, region, prog);
        });
      } else {
        sends_to_resume_.push_back({rec, o, src, src_region, region, prog});
      }
      continue;
    }
    lock.unlock();
    spawn([this, rec, o, src, src_region, region, prog] {
      run_copy_point(rec, o, src, src_region, region, prog);
    });
  }
  // Points being received from peers: each holds its region's GC until its
  // writer names what its interrupted run checkpointed (run_receive_point).
  std::vector<std::pair<RestorePointRecord, PeerPull>> receives;
  receives.swap(receives_to_resume_);
  for (auto& [rec, pull] : receives) {
    std::lock_guard<std::mutex> lock(mu_);
    auto coll = db_->get_collection(rec.collection);
    auto op = db_->get_operation(rec.operation_id);
    if (!coll.ok() || !coll.value() || !op.ok() || !op.value()) {
      spdlog::error("restore point {}/{}: cannot resume receiving it", rec.collection, rec.name);
      continue;
    }
    hold_gc(coll.value()->region);
    start_receive_locked(rec, *op.value(), pull, coll.value()->region, true);
  }
}

// The newest Succeeded point of `collection` holding `disk` in a tree the
// copy can start from (same chunk size, not larger): the target's previous
// copy, whose tree the new one is compared with. Caller holds mu_.
static std::optional<DiskRestorePointRecord> CopyBase(RestoreDb& db, const std::string& collection,
                                                      const std::string& disk,
                                                      const store::PointReader& src,
                                                      std::string* point_name) {
  auto points = db.list_points(collection);
  if (!points.ok()) return std::nullopt;
  for (auto it = points.value().rbegin(); it != points.value().rend(); ++it) {
    if (it->provisioning_state != "Succeeded") continue;
    for (const auto& d : it->disk_restore_points) {
      if (d.disk == disk && d.store_point && d.size_bytes <= src.size() &&
          d.granularity == src.chunk_size()) {
        *point_name = it->name;
        return d;
      }
    }
  }
  return std::nullopt;
}

void RestoreServiceImpl::run_copy_point(RestorePointRecord rec, OperationRecord op,
                                        RestorePointRecord src, std::string src_region,
                                        std::string region, std::shared_ptr<PointProgress> prog) {
  auto src_st = store_of(src_region);
  auto st = store_of(region);
  std::optional<JobError> err;
  uint64_t moved = 0, chunks_moved = 0, chunks_reused = 0, looked_up = 0, compared_from = 0;
  if (!src_st || !st) {
    err = JobError{"RegionUnavailable", no_store(src_st ? region : src_region).message()};
  }
  // A delete of the copy (or of its collection) cancels it: it ends Failed
  // (Canceled) and finish_copy deletes the store points it committed.
  const JobError canceled{"Canceled", "the copy was canceled: restore point " +
                                          PointId(rec.collection, rec.name) +
                                          " was deleted while it was being copied"};
  for (size_t i = 0; !err && i < rec.disk_restore_points.size(); ++i) {
    auto& d = rec.disk_restore_points[i];
    const auto& sd = src.disk_restore_points[i];
    if (prog->cancel.load()) {
      err = canceled;
      break;
    }
    prog->started[i].store(true);
    if (d.status == "Succeeded" && d.store_point) continue;  // committed before a restart
    auto reader =
        OpenDiskPoint(*src_st, sd.store_point, DiskPointId(src.collection, src.name, sd.disk));
    if (!reader.ok()) {
      d.status = "Failed";
      err = JobError{"CopyFailed",
                     "disk '" + d.disk + "': reading the source: " + reader.status().message()};
      break;
    }
    store::PointParams pp;
    pp.size = reader.value()->size();
    pp.chunk_size = reader.value()->chunk_size();
    pp.tag = DiskPointId(rec.collection, rec.name, d.disk);
    // Start from the target's previous copy of the disk: only what differs
    // from its tree is visited (an unreadable base just means a full walk).
    std::optional<DiskRestorePointRecord> base_rec;
    std::string base_name;
    {
      std::lock_guard<std::mutex> lock(mu_);
      base_rec = CopyBase(*db_, rec.collection, d.disk, *reader.value(), &base_name);
    }
    std::shared_ptr<store::PointReader> base;
    if (base_rec) {
      auto b =
          OpenDiskPoint(*st, base_rec->store_point, DiskPointId(rec.collection, base_name, d.disk));
      if (b.ok()) {
        base = std::move(b).value();
        pp.parent = base_rec->store_point;
      } else {
        spdlog::warn("restore point {}/{}: disk {}: base store point {} unreadable ({}): full walk",
                     rec.collection, rec.name, d.disk, base_rec->store_point,
                     b.status().ToString());
      }
    }
    auto target = StoreChunkTarget::Begin(st, pp);
    if (!target.ok()) {
      d.status = "Failed";
      err = JobError{"CopyFailed", "disk '" + d.disk + "': " + target.status().message()};
      break;
    }
    CopyProgress cp;
    // What a run before a restart recorded as durable: progress never shows
    // less (this run reuses those chunks at once).
    const uint64_t floor = d.blocks_copied;
    auto publish = [&] {
      prog->to_copy[i].store(cp.slots_total.load());
      prog->copied[i].store(std::max(floor, cp.slots_done.load()));
    };
    // Asked between chunks: publishes the progress for GETs too.
    auto stop = [&] {
      publish();
      return stopping_.load() || prog->cancel.load();
    };
    CopyOptions co;
    co.base = base.get();
    co.on_checkpoint = [&] {
      // The chunks moved so far are durable in the target: record the
      // progress, so a resumed copy shows it from the start.
      d.status = "InProgress";
      d.blocks_to_copy = cp.slots_total.load();
      d.blocks_copied = std::max(floor, cp.slots_done.load());
      std::lock_guard<std::mutex> lock(mu_);
      Status s = db_->save_point(rec);
      if (!s.ok()) spdlog::warn("restore point {}/{}: {}", rec.collection, rec.name, s.ToString());
    };
    auto info = CopyDiskPoint(*reader.value(), *target.value(), cp, stop, co);
    if (!info.ok()) {
      d.status = "Failed";
      if (prog->cancel.load()) {  // whatever stopped it: a cancel says so
        err = canceled;
      } else {
        err = JobError{info.status().code() == Code::kShutdown ? "Interrupted" : "CopyFailed",
                       "disk '" + d.disk + "': " + info.status().message()};
      }
      break;
    }
    d.store_point = info->id;
    d.full = !base;
    d.parent_store_point = base ? base_rec->store_point : 0;
    d.bytes_stored = cp.bytes_moved.load();
    d.blocks_to_copy = cp.slots_total.load();
    d.blocks_copied = cp.slots_done.load();
    d.completion_percent = 100;
    d.status = "Succeeded";
    moved += cp.bytes_moved.load();
    chunks_moved += cp.chunks_moved.load();
    chunks_reused += cp.chunks_reused.load();
    looked_up += cp.chunks_looked_up.load();
    if (base) ++compared_from;
    {
      // Named by the record at once: a restart resumes after this disk, and
      // a copy that then fails deletes it.
      std::lock_guard<std::mutex> lock(mu_);
      Status s = db_->save_point(rec);
      if (!s.ok()) spdlog::warn("restore point {}/{}: {}", rec.collection, rec.name, s.ToString());
    }
  }
  if (!err && prog->cancel.load()) err = canceled;
  if (!err) {
    // The target region's own record, before the transaction (as for a cut
    // point: a crash in between leaves it Creating, and Open removes it).
    err = write_manifest(*st, rec);
  }
  // The same ending as a copy received from a peer (restore/peer_jobs.cpp).
  finish_copy(rec, op, err, st.get(),
              {{"bytesMoved", moved},
               {"chunksMoved", chunks_moved},
               {"chunksReused", chunks_reused},
               {"chunksLookedUp", looked_up},
               {"disksComparedWithBase", compared_from}},
              fmt::format("{} bytes moved ({} chunks), {} chunks already in region {}", moved,
                          chunks_moved, chunks_reused, region));
}

}  // namespace rpoint
