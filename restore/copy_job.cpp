// Copying a restore point to a collection of the same VM in another region:
// validation, the job (restore/point_copy.h moves the chunks the target region
// lacks), the manifest and the final transaction. A copy is a point like any
// other once Succeeded (exported, restorable, independent of its source);
// while it is Creating nothing can use it, and a crash leaves it Creating,
// which Open turns into Failed (its committed store points deleted), exactly
// as for a point being cut. docs/restore-points.md, *Copies between regions*.
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
  auto coll = db_->get_collection(collection);
  if (!coll.ok()) return coll.status();
  if (!coll.value()) return Status::NotFound("collection '" + collection + "' not found");
  if (deleting_collections_.count(collection)) {
    return Status::Conflict("collection '" + collection + "' is being deleted");
  }
  const std::string region = coll.value()->region;
  if (!store_of(region) && !peer_region(region)) {
    return Status::Conflict("collection '" + collection + "' is in region '" + region +
                            "', which is no longer configured");
  }
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
  if (src_coll.value()->source_vm != coll.value()->source_vm) {
    return Status::Conflict("collection '" + collection + "' is for VM '" +
                            coll.value()->source_vm + "', the source " + src_id + " for VM '" +
                            src_coll.value()->source_vm +
                            "'; a copy goes to a collection of the same VM");
  }
  if (src.provisioning_state != "Succeeded" || !store_of(src_region)) {
    return Status::Conflict("restore point " + src_id + " is " + src.provisioning_state +
                            (store_of(src_region) ? "" : " in an unconfigured region") +
                            ", not Succeeded; only a complete point can be copied");
  }
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
    d.full = true;  // a tree of its own in the target region
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

void RestoreServiceImpl::run_copy_point(RestorePointRecord rec, OperationRecord op,
                                        RestorePointRecord src, std::string src_region,
                                        std::string region, std::shared_ptr<PointProgress> prog) {
  auto src_st = store_of(src_region);
  auto st = store_of(region);
  std::optional<JobError> err;
  uint64_t moved = 0, chunks_moved = 0, chunks_reused = 0;
  if (!src_st || !st) err = JobError{"RegionUnavailable", "a region of the copy is not configured"};
  for (size_t i = 0; !err && i < rec.disk_restore_points.size(); ++i) {
    auto& d = rec.disk_restore_points[i];
    const auto& sd = src.disk_restore_points[i];
    prog->started[i].store(true);
    auto reader = src_st->open_point(sd.store_point);
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
    auto target = StoreChunkTarget::Begin(st, pp);
    if (!target.ok()) {
      d.status = "Failed";
      err = JobError{"CopyFailed", "disk '" + d.disk + "': " + target.status().message()};
      break;
    }
    CopyProgress cp;
    // Asked between chunks: publishes the progress for GETs too.
    auto stop = [&] {
      prog->to_copy[i].store(cp.slots_total.load());
      prog->copied[i].store(cp.slots_done.load());
      return stopping_.load();
    };
    auto info = CopyDiskPoint(*reader.value(), *target.value(), cp, stop);
    if (!info.ok()) {
      d.status = "Failed";
      err = JobError{info.status().code() == Code::kShutdown ? "Interrupted" : "CopyFailed",
                     "disk '" + d.disk + "': " + info.status().message()};
      break;
    }
    d.store_point = info->id;
    d.bytes_stored = cp.bytes_moved.load();
    d.blocks_to_copy = cp.slots_total.load();
    d.blocks_copied = cp.slots_done.load();
    d.completion_percent = 100;
    d.status = "Succeeded";
    moved += cp.bytes_moved.load();
    chunks_moved += cp.chunks_moved.load();
    chunks_reused += cp.chunks_reused.load();
  }
  if (!err) {
    // The target region's own record, before the transaction (as for a cut
    // point: a crash in between leaves it Creating, and Open removes it).
    err = write_manifest(*st, rec);
  }
  auto fail_locally = [&] {
    for (auto& d : rec.disk_restore_points) {
      if (d.store_point && st) (void)st->delete_point(d.store_point);
      d.store_point = 0;
      if (d.status != "Succeeded") d.status = "Failed";
    }
    rec.provisioning_state = "Failed";
    rec.error_code = err->code;
    rec.error_message = err->message;
  };
  if (err) {
    spdlog::error("restore point {}/{}: copy of {} failed: {}: {}", rec.collection, rec.name,
                  rec.source_restore_point, err->code, err->message);
    fail_locally();
  } else {
    rec.provisioning_state = "Succeeded";
  }
  std::unique_lock<std::mutex> lock(mu_);
  EndOperation(op, err ? &*err : nullptr, NowRfc3339());
  op.result = {
      {"bytesMoved", moved}, {"chunksMoved", chunks_moved}, {"chunksReused", chunks_reused}};
  Status s = save_point_retrying_locked(rec, &op, nullptr);
  if (!s.ok() && !err) {
    err = JobError{"MetadataCommitFailed",
                   "recording the restore point in the metadata database failed: " + s.message()};
    if (st) (void)st->remove_manifest(ManifestName(rec.collection, rec.name));
    fail_locally();
    EndOperation(op, &*err, NowRfc3339());
    s = save_point_retrying_locked(rec, &op, nullptr);
  }
  if (!s.ok()) {
    spdlog::error("restore point {}/{}: cannot record its end ({}): {}", rec.collection, rec.name,
                  rec.provisioning_state, s.ToString());
    unrecorded_[rec.collection + "/" + rec.name] = {rec, op};
  } else if (!err) {
    spdlog::info(
        "restore point {}/{}: copied from {}: {} bytes moved ({} chunks), {} chunks already in "
        "region {}",
        rec.collection, rec.name, rec.source_restore_point, moved, chunks_moved, chunks_reused,
        region);
  }
  live_points_.erase(rec.collection + "/" + rec.name);
}

}  // namespace rpoint
