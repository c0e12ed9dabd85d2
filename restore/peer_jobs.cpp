// Regions on other hosts (restore/peer_link.h): both halves of a copy to a
// peer region. The sending host (run_send_point) shares each source disk
// point as an NBD-over-TLS access grant, posts the point with its chunk
// digests to the peer, and polls its progress; the keeping host
// (receive_restore_point / run_receive_point) reads with libnbd only the
// chunks its region lacks, re-hashes each (StoreChunkTarget::put), commits,
// writes the manifest and records the point Succeeded. A point is Succeeded on
// the sending host only once the peer says its copy is, never with data
// missing on the peer. A restart of either host resumes the copy: the sender
// shares and posts the same pull again (an idempotent repeat that hands the
// running receive new grant uris); the receiver keeps the pull in a file,
// checkpoints what it read, and on its restart resumes from both, naming the
// chunks it already holds (under a GC hold until it has) and reading the rest.
// A cut is retried with backoff up to peers.deadline_seconds.
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "common/fault_injection.h"
#include "common/file_io.h"
#include "common/unique_fd.h"
#include "disks/disk_files.h"
#include "restore/manifest.h"
#include "restore/nbd_source.h"
#include "restore/point_copy.h"
#include "restore/restore_service_impl.h"
#include "store/format.h"
#include "store/point_reader.h"

namespace rpoint {

namespace {

std::string PeerPath(const std::string& collection, const std::string& name) {
  return "/peer/v1/restorePointCollections/" + collection + "/restorePoints/" + name;
}

using SlotDigests = std::vector<std::pair<uint64_t, store::Digest>>;
using SlotRuns = std::vector<std::pair<uint64_t, uint64_t>>;  // [first slot, end slot)

// The digests of the slots in `runs`, in slot order; holes left out, or
// (keep_holes) listed with a zero digest.
Result<SlotDigests> DigestsOf(store::PointReader& r, const SlotRuns& runs, bool keep_holes) {
  SlotDigests out;
  for (const auto& [run_first, run_end] : runs) {
    for (uint64_t first = run_first; first < run_end;) {
      // resolve() takes slots of one leaf page.
      uint64_t leaf_end = (first / store::kFanout + 1) * store::kFanout;
      uint32_t count = static_cast<uint32_t>(std::min(leaf_end, run_end) - first);
      auto locs = r.resolve(first, count);
      if (!locs.ok()) return locs.status();
      for (uint32_t i = 0; i < count; ++i) {
        const auto& l = locs.value()[i];
        if (l.state != store::PointReader::Location::kHole) {
          out.emplace_back(first + i, l.digest);
        } else if (keep_holes) {
          out.emplace_back(first + i, store::Digest{});
        }
      }
      first += count;
    }
  }
  return out;
}

// Every data slot of a disk point with its digest.
Result<SlotDigests> DataChunks(store::PointReader& r) {
  return DigestsOf(r, {{0, r.slots()}}, false);
}

// The slots of `r` whose digest differs from `base` (the same tree diff the
// rpoint:changed context answers), a zero digest for a slot that became a hole.
Result<SlotDigests> ChangedChunks(store::PointReader& r, store::PointReader& base) {
  auto ext = r.changed_extents(base, 0, r.size());
  if (!ext.ok()) return ext.status();
  SlotRuns runs;
  uint64_t off = 0;
  for (const Extent& e : ext.value()) {
    if (e.flags & MetaContext::kDirty) AddSlotRun(&runs, off, e.length, r.chunk_size());
    off += e.length;
  }
  return DigestsOf(r, runs, true);
}

// "rpoint:changed:c/rp" for "/restorePointCollections/c/restorePoints/rp";
// empty for another shape.
std::string ChangedContextOf(const std::string& point_id) {
  auto parts = Split(point_id, '/');
  if (parts.size() != 5 || parts[0].size() || parts[1] != "restorePointCollections" ||
      parts[3] != "restorePoints" || parts[2].empty() || parts[4].empty()) {
    return {};
  }
  return "rpoint:changed:" + parts[2] + "/" + parts[4];
}

}  // namespace

const RegionSpec* RestoreServiceImpl::peer_region(const std::string& region) const {
  for (const auto& r : regions_) {
    if (r.name == region && !r.peer.empty()) return &r;
  }
  return nullptr;
}

Status RestoreServiceImpl::kept_here(const std::string& region, const std::string& collection,
                                     const std::string& name) {
  const RegionSpec* peer = peer_region(region);
  if (!peer) return store_of(region) ? Status::Ok() : no_store(region);
  return Status::Conflict("restore point " + PointId(collection, name) + " is in region '" +
                          region + "', kept by peer " + peer->peer +
                          ": its data is there; use that host's API");
}

Result<std::pair<CollectionRecord, bool>> RestoreServiceImpl::put_peer_collection(
    const std::string& name, const std::string& source_vm, const std::string& region) {
  Status s = ValidateResourceName("collection", name);
  if (s.ok()) s = ValidateResourceName("VM", source_vm);
  if (!s.ok()) return s;
  if (missing_stores_.count(region)) return no_store(region);
  if (!stores_.count(region)) {
    return Status::NotFound("region '" + region + "' is not kept on this host");
  }
  return insert_collection(name, source_vm, region, false);
}

void RestoreServiceImpl::finish_copy(RestorePointRecord& rec, OperationRecord& op,
                                     std::optional<JobError> err, store::Store* st,
                                     nlohmann::json result, const std::string& summary) {
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
  op.result = std::move(result);
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
    spdlog::info("restore point {}/{}: copied from {}: {}", rec.collection, rec.name,
                 rec.source_restore_point, summary.empty() ? op.result.dump() : summary);
  }
  end_job_locked(rec.collection + "/" + rec.name);
}

// ---- the sending host ----

std::optional<RestoreServiceImpl::PeerSendBase> RestoreServiceImpl::peer_send_base_locked(
    const std::string& collection, const RestorePointRecord& src, const std::string& src_region) {
  auto points = db_->list_points(collection);
  if (!points.ok()) return std::nullopt;
  const std::string src_id = PointId(src.collection, src.name);
  for (auto it = points.value().rbegin(); it != points.value().rend(); ++it) {
    // The context is not offered against the point itself: a second copy of
    // the same source takes an older base (or none).
    if (it->provisioning_state != "Succeeded" || it->source_restore_point == src_id) continue;
    auto parts = Split(it->source_restore_point, '/');
    if (parts.size() != 5 || ChangedContextOf(it->source_restore_point).empty()) continue;
    auto found = find_point_locked(parts[2], parts[4]);
    // The same point, not one made again under its name since the copy.
    if (!found.ok() || found.value().region != src_region ||
        found.value().point.provisioning_state != "Succeeded" ||
        found.value().point.time_created != it->time_created) {
      continue;
    }
    return PeerSendBase{it->name, std::move(found.value().point), *it};
  }
  return std::nullopt;
}

void RestoreServiceImpl::run_send_point(RestorePointRecord rec, OperationRecord op,
                                        RestorePointRecord src, std::string src_region,
                                        std::string region, std::shared_ptr<PointProgress> prog) {
  const RegionSpec* peer = peer_region(region);
  auto src_st = store_of(src_region);
  PointSharer* sharer = sharer_.load();
  std::optional<JobError> err;
  const auto deadline = std::chrono::seconds(options_.peer_deadline_seconds);
  PeerPull pull;
  std::optional<PeerSendBase> base;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto c = db_->get_collection(rec.collection);
    if (c.ok() && c.value()) pull.source_vm = c.value()->source_vm;
    base = peer_send_base_locked(rec.collection, src, src_region);
  }
  pull.source_restore_point = rec.source_restore_point;
  pull.consistency_mode = rec.consistency_mode;
  pull.time_created = rec.time_created;
  pull.exclude_disks = rec.exclude_disks;
  pull.source_metadata = rec.source_metadata;
  std::vector<std::string> shared;
  std::vector<std::shared_ptr<store::PointReader>> readers;
  if (!peer || !src_st) {
    err = JobError{"RegionUnavailable", no_store(src_st ? region : src_region).message()};
  }
  if (!err && !sharer) {
    err = JobError{"PeerCopyUnavailable", "this daemon cannot share points with peers"};
  }
  // The base's reader of disk `disk` when both the base and its far copy hold
  // that disk in a tree of the same size and chunk size (else: a full list).
  auto base_reader = [&](const DiskRestorePointRecord& sd) -> std::shared_ptr<store::PointReader> {
    if (!base) return nullptr;
    bool far_has = false;
    for (const auto& fd : base->far.disk_restore_points) far_has |= fd.disk == sd.disk;
    for (const auto& bd : base->source.disk_restore_points) {
      if (bd.disk != sd.disk || !far_has || !bd.store_point || bd.size_bytes != sd.size_bytes ||
          bd.granularity != sd.granularity) {
        continue;
      }
      auto r = OpenDiskPoint(*src_st, bd.store_point,
                             DiskPointId(base->source.collection, base->source.name, bd.disk));
      if (r.ok()) return std::move(r).value();
      spdlog::warn("restore point {}/{}: disk {}: base {} unreadable ({}): full list",
                   rec.collection, rec.name, sd.disk, base->far_point, r.status().ToString());
    }
    return nullptr;
  };
  for (size_t i = 0; !err && i < rec.disk_restore_points.size(); ++i) {
    const auto& sd = src.disk_restore_points[i];
    auto reader =
        OpenDiskPoint(*src_st, sd.store_point, DiskPointId(src.collection, src.name, sd.disk));
    std::shared_ptr<store::PointReader> from = reader.ok() ? base_reader(sd) : nullptr;
    Result<SlotDigests> chunks = !reader.ok() ? Result<SlotDigests>(reader.status())
                                 : from       ? ChangedChunks(*reader.value(), *from)
                                              : DataChunks(*reader.value());
    if (!chunks.ok()) {
      err = JobError{"CopyFailed",
                     "disk '" + sd.disk + "': reading the source: " + chunks.status().message()};
      break;
    }
    // Long enough for every retry of the copy; revoked as soon as it ends.
    auto uri =
        sharer->share(src.collection, src.name, sd.disk, 4 * options_.peer_deadline_seconds + 3600);
    if (!uri.ok()) {
      err = JobError{"CopyFailed",
                     "disk '" + sd.disk + "': sharing it with the peer: " + uri.status().message()};
      break;
    }
    shared.push_back(sd.disk);
    readers.push_back(reader.value());
    PeerPullDisk pd;
    pd.disk = sd.disk;
    pd.size_bytes = reader.value()->size();
    pd.granularity = sd.granularity;
    pd.chunk_size = reader.value()->chunk_size();
    pd.uri = uri.value();
    pd.chunks = std::move(chunks).value();
    pd.changed = from != nullptr;
    rec.disk_restore_points[i].full = !pd.changed;
    prog->started[i].store(true);
    prog->to_copy[i].store(pd.chunks.size());
    pull.disks.push_back(std::move(pd));
  }
  bool incremental = false;
  for (const auto& pd : pull.disks) incremental |= pd.changed;
  if (incremental) {
    pull.base_restore_point = base->far_point;
    pull.base_source_restore_point = base->far.source_restore_point;
    pull.base_time_created = base->far.time_created;
  }
  // A peer without the base (deleted there, or older than bases) refuses the
  // changed lists: then every disk's full list.
  auto go_full = [&]() -> Status {
    for (size_t i = 0; i < pull.disks.size(); ++i) {
      if (!pull.disks[i].changed) continue;
      auto chunks = DataChunks(*readers[i]);
      if (!chunks.ok()) return chunks.status();
      pull.disks[i].chunks = std::move(chunks).value();
      pull.disks[i].changed = false;
      rec.disk_restore_points[i].full = true;
      prog->to_copy[i].store(pull.disks[i].chunks.size());
    }
    pull.base_restore_point.clear();
    pull.base_source_restore_point.clear();
    pull.base_time_created.clear();
    return Status::Ok();
  };

  // Retried with backoff while the peer cannot be reached; an answer that
  // names an error ends the copy.
  const std::string path = PeerPath(rec.collection, rec.name);
  auto backoff = std::chrono::milliseconds(200);
  auto last_answer = std::chrono::steady_clock::now();
  bool posted = false;
  nlohmann::json result = {{"peer", peer ? peer->peer : ""}};
  auto note_pull = [&](const nlohmann::json& body) {
    // The size of what the pull asked of the peer: with a base it follows the change.
    uint64_t listed = 0;
    for (const auto& pd : pull.disks) listed += pd.chunks.size();
    result["pullBytes"] = body.dump().size();
    result["chunksListed"] = listed;
    if (pull.base_restore_point.empty()) {
      result.erase("base");
    } else {
      result["base"] = pull.base_restore_point;
    }
  };
  nlohmann::json body = EncodePeerPull(pull);
  note_pull(body);
  bool stopped = false;
  // Set when the peer's own answer ended the copy: nothing to tell it then.
  bool peer_ended = false;
  const std::string canceled = "the copy was canceled: restore point " +
                               PointId(rec.collection, rec.name) +
                               " was deleted on the sending host";
  // Waits, but not past a stop or a cancel (both wake it at once).
  auto ended = [&] { return stopping_.load() || prog->cancel.load(); };
  while (!err) {
    if (prog->cancel.load()) {
      err = JobError{"Canceled", canceled};
      break;
    }
    if (stopping_.load()) {
      // Still Creating, its operation InProgress: the next start resumes it.
      stopped = true;
      break;
    }
    Result<nlohmann::json> r = posted ? peer_link_->call(peer->peer, "GET", path, nullptr)
                                      : peer_link_->call(peer->peer, "POST", path, body);
    if (!r.ok()) {
      if (!posted && !pull.base_restore_point.empty() &&
          (r.status().code() == Code::kNotFound || r.status().code() == Code::kInvalidArgument)) {
        spdlog::warn("restore point {}/{}: peer {} cannot start from {} ({}): sending full lists",
                     rec.collection, rec.name, peer->peer, pull.base_restore_point,
                     r.status().message());
        if (Status s = go_full(); !s.ok()) {
          err = JobError{"CopyFailed", "reading the source: " + s.message()};
          break;
        }
        body = EncodePeerPull(pull);
        note_pull(body);
        result["baseRefused"] = r.status().message();
        continue;
      }
      if (posted && r.status().code() == Code::kNotFound) {
        // It was there: deleted on the peer while it was being received.
        err = JobError{"Canceled", "the copy was canceled on peer " + peer->peer +
                                       ": its restore point is gone there (deleted while it was "
                                       "being received): " +
                                       r.status().message()};
        peer_ended = true;
        break;
      }
      if (r.status().code() != Code::kIoError) {
        err = JobError{"PeerCopyFailed", r.status().message()};
        peer_ended = true;
        break;
      }
      if (std::chrono::steady_clock::now() - last_answer > deadline) {
        err = JobError{"PeerUnreachable", r.status().message() + " (gave up after " +
                                              std::to_string(deadline.count()) +
                                              " s without an answer)"};
        peer_ended = true;  // it could not be told anyway
        break;
      }
      spdlog::warn("restore point {}/{}: peer {}: {}; retrying in {} ms", rec.collection, rec.name,
                   peer->peer, r.status().message(), backoff.count());
      nap(backoff, ended);
      backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(5));
      continue;
    }
    posted = true;
    last_answer = std::chrono::steady_clock::now();
    backoff = std::chrono::milliseconds(200);
    auto state = DecodePeerPointState(r.value());
    if (!state.ok()) {
      err = JobError{"PeerCopyFailed", state.status().message()};
      break;
    }
    if (prog->cancel.load() && state->provisioning_state != "Succeeded") continue;
    uint64_t bytes = 0;
    for (size_t i = 0; i < state->disks.size() && i < prog->copied.size(); ++i) {
      prog->to_copy[i].store(state->disks[i].to_copy);
      prog->copied[i].store(state->disks[i].copied);
      bytes += state->disks[i].bytes_moved;
    }
    result["bytesMoved"] = bytes;
    result["chunksLookedUp"] = state->chunks_looked_up;
    if (state->provisioning_state == "Succeeded") {
      for (size_t i = 0; i < rec.disk_restore_points.size(); ++i) {
        auto& d = rec.disk_restore_points[i];
        d.status = "Succeeded";
        d.completion_percent = 100;
        if (i < state->disks.size()) {
          d.blocks_to_copy = state->disks[i].to_copy;
          d.blocks_copied = state->disks[i].copied;
          d.bytes_stored = state->disks[i].bytes_moved;
        }
      }
      break;
    }
    if (state->provisioning_state != "Creating") {
      // Canceled there (its point being deleted): canceled here too.
      const bool canceled_there = state->error_code == "Canceled";
      err = JobError{canceled_there ? "Canceled" : "PeerCopyFailed",
                     (canceled_there ? "the copy was canceled on peer " : "peer ") + peer->peer +
                         ": the copy there is " + state->provisioning_state + ": " +
                         state->error_code + ": " + state->error_message};
      peer_ended = true;
      break;
    }
    nap(std::chrono::milliseconds(200), ended);
  }
  for (const auto& disk : shared) sharer->unshare(src.collection, src.name, disk);
  if (err && !peer_ended && peer) {
    // This host ended the copy (canceled, or it cannot read or share its
    // source): the peer stops at once instead of waiting out its deadline.
    PeerAbort a{rec.source_restore_point, err->code, err->message, prog->cancel.load()};
    Status told = tell_peer_abort(region, rec.collection, rec.name, a, std::chrono::seconds(10));
    if (told.code() == Code::kConflict) {
      err->message += "; peer " + peer->peer + " keeps its copy: " + told.message();
    } else if (!told.ok()) {
      err->message += "; peer " + peer->peer + " could not be told (" + told.message() +
                      "): its half fails after peers.deadline_seconds";
    }
  }
  if (stopped) {
    spdlog::info(
        "restore point {}/{}: rpointd stopping: the copy to peer {} resumes at the next start",
        rec.collection, rec.name, peer->peer);
    std::lock_guard<std::mutex> lock(mu_);
    end_job_locked(rec.collection + "/" + rec.name);
    return;
  }
  finish_copy(rec, op, err, nullptr, std::move(result));
}

void RestoreServiceImpl::set_point_sharer(PointSharer* sharer) {
  std::vector<PendingSend> sends;
  {
    std::lock_guard<std::mutex> lock(mu_);
    sharer_ = sharer;
    if (sharer) sends.swap(sends_to_resume_);
  }
  for (auto& p : sends) {
    spawn([this, p] { run_send_point(p.rec, p.op, p.src, p.src_region, p.region, p.prog); });
  }
}

// ---- the keeping host ----

Result<std::vector<store::PointId>> RestoreServiceImpl::peer_base_disks_locked(
    const std::string& collection, const PeerPull& pull) {
  auto b = db_->get_point(collection, pull.base_restore_point);
  if (!b.ok()) return b.status();
  const std::string what = "copy base: restore point '" + pull.base_restore_point +
                           "' of collection '" + collection + "'";
  if (!b.value() || b.value()->provisioning_state != "Succeeded" ||
      b.value()->source_restore_point != pull.base_source_restore_point ||
      b.value()->time_created != pull.base_time_created) {
    return Status::NotFound(what + " is not here as a Succeeded copy of " +
                            pull.base_source_restore_point);
  }
  std::vector<store::PointId> out;
  for (const auto& pd : pull.disks) {
    store::PointId sp = 0;
    for (const auto& d : b.value()->disk_restore_points) {
      if (pd.changed && d.disk == pd.disk && d.size_bytes == pd.size_bytes &&
          d.granularity == pd.granularity && d.status == "Succeeded") {
        sp = d.store_point;
      }
    }
    if (pd.changed && !sp) {
      return Status::NotFound(what + " holds no disk '" + pd.disk + "' of " +
                              std::to_string(pd.size_bytes) + " bytes to start from");
    }
    out.push_back(sp);
  }
  return out;
}

Result<Started<RestorePointRecord>> RestoreServiceImpl::receive_restore_point(
    const std::string& collection, const std::string& name, const PeerPull& pull) {
  if (stopping_.load()) return Status::Shutdown("rpointd is stopping");
  Status s = ValidateResourceName("restore point", name);
  for (const auto& d : pull.disks) {
    if (s.ok()) s = ValidateResourceName("disk", d.disk);
  }
  if (!s.ok()) return s;
  std::unique_lock<std::mutex> lock(mu_);
  auto coll = db_->get_collection(collection);
  if (!coll.ok()) return coll.status();
  if (!coll.value()) return Status::NotFound("collection '" + collection + "' not found");
  if (deleting_collections_.count(collection)) {
    return Status::Conflict("collection '" + collection + "' is being deleted");
  }
  const std::string region = coll.value()->region;
  if (!store_of(region)) {
    if (!stores_.count(region)) {
      return Status::Conflict("collection '" + collection +
                              "' is not in a region kept on this host");
    }
    return no_store(region);
  }
  auto existing = db_->get_point(collection, name);
  if (!existing.ok()) return existing.status();
  std::optional<RestorePointRecord> again;  // a Failed copy of the same source, posted again
  if (existing.value()) {
    RestorePointRecord p = *existing.value();
    if (p.source_restore_point != pull.source_restore_point || p.provisioning_state == "Deleting") {
      return Status::Conflict("restore point '" + name + "' already exists in collection '" +
                              collection + "'");
    }
    const std::string key = collection + "/" + name;
    auto live = receiving_.find(key);
    if (p.provisioning_state == "Succeeded" ||
        (p.provisioning_state == "Creating" && live != receiving_.end())) {
      // The same copy posted again (a sender that restarted, or a retried
      // post): idempotent. Its grant uris replace the running job's, which
      // connects to them next (a restarted sender's old tokens are gone).
      if (live != receiving_.end()) {
        std::lock_guard<std::mutex> ul(live->second->mu);
        for (const auto& pd : pull.disks) {
          for (size_t i = 0; i < p.disk_restore_points.size(); ++i) {
            if (p.disk_restore_points[i].disk == pd.disk && i < live->second->uris.size()) {
              live->second->uris[i] = pd.uri;
            }
          }
        }
      }
      overlay(p);
      std::string op = p.operation_id;
      return Started<RestorePointRecord>{std::move(p), op, false};
    }
    // Failed (a deadline passed while the sender was down, say): the sender
    // resumed, so this host goes on with a new operation; what it stored and
    // checkpointed before is found by has() and not read again.
    again = std::move(p);
  }
  // NotFound for a base this host does not hold as the sender thinks: the
  // sender then sends full lists. Re-checked by the job, which pins it.
  if (!pull.base_restore_point.empty()) {
    if (ChangedContextOf(pull.base_source_restore_point).empty()) {
      return Status::InvalidArgument("peer request: the base's sourceRestorePoint " +
                                     pull.base_source_restore_point + " is not a point id");
    }
    auto b = peer_base_disks_locked(collection, pull);
    if (!b.ok()) return b.status();
  }
  RestorePointRecord rec;
  rec.collection = collection;
  rec.name = name;
  rec.consistency_mode = pull.consistency_mode;
  rec.exclude_disks = pull.exclude_disks;
  rec.provisioning_state = "Creating";
  rec.time_created = pull.time_created;
  rec.source_metadata = pull.source_metadata;
  rec.source_restore_point = pull.source_restore_point;
  for (const auto& pd : pull.disks) {
    DiskRestorePointRecord d;
    d.disk = pd.disk;
    d.size_bytes = pd.size_bytes;
    d.granularity = pd.granularity;
    d.full = !pd.changed;
    d.status = "Pending";
    rec.disk_restore_points.push_back(d);
  }
  // The pull first: a record Creating without it would not resume.
  s = save_pull(collection, name, pull);
  if (!s.ok()) return s;
  OperationRecord op = new_operation("CopyRestorePoint", PointId(collection, name));
  rec.operation_id = op.id;
  s = db_->save_point(rec, &op);
  if (!s.ok()) {
    remove_pull(collection, name);
    return s;
  }
  spdlog::info("restore point {}/{}: receiving {} from a peer{}, operation {}", collection, name,
               pull.source_restore_point, again ? " again (its last try failed)" : "", op.id);
  start_receive_locked(rec, op, pull, region, false);
  return Started<RestorePointRecord>{rec, op.id, !again};
}

void RestoreServiceImpl::start_receive_locked(const RestorePointRecord& rec,
                                              const OperationRecord& op, const PeerPull& pull,
                                              const std::string& region, bool gc_held) {
  auto prog = std::make_shared<PointProgress>(rec.disk_restore_points.size());
  for (size_t i = 0; i < rec.disk_restore_points.size(); ++i) {
    // What an interrupted run recorded, until this one has gone past it.
    prog->to_copy[i].store(rec.disk_restore_points[i].blocks_to_copy);
    prog->copied[i].store(rec.disk_restore_points[i].blocks_copied);
  }
  auto rx = std::make_shared<PeerReceive>(pull);
  live_points_[rec.collection + "/" + rec.name] = prog;
  receiving_[rec.collection + "/" + rec.name] = rx;
  spawn([this, rec, op, pull, region, prog, rx, gc_held] {
    run_receive_point(rec, op, pull, region, prog, rx, gc_held);
  });
}

std::string RestoreServiceImpl::pull_path(const std::string& collection,
                                          const std::string& name) const {
  return options_.staging_dir + "/peer-pulls/" + collection + "/" + name + ".pull";
}

Status RestoreServiceImpl::save_pull(const std::string& collection, const std::string& name,
                                     const PeerPull& pull) {
  const std::string path = pull_path(collection, name);
  const std::string dir = path.substr(0, path.rfind('/'));
  Status s = MakeDirs(dir, 0700);
  if (!s.ok()) return s;
  const std::string text = EncodePeerPull(pull).dump();
  const std::string tmp = path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return Status::FromErrno(errno, "creating " + tmp);
  s = PwriteFull(fd.get(), text.data(), text.size(), 0, tmp);
  if (s.ok() && ::fsync(fd.get()) != 0) s = Status::FromErrno(errno, "fsync " + tmp);
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    s = Status::FromErrno(errno, "renaming " + tmp);
  }
  if (s.ok()) s = FsyncDir(dir);
  if (!s.ok()) (void)::unlink(tmp.c_str());
  return s;
}

Result<PeerPull> RestoreServiceImpl::load_pull(const std::string& collection,
                                               const std::string& name) const {
  const std::string path = pull_path(collection, name);
  std::ifstream in(path);
  if (!in) return Status::NotFound("cannot open " + path);
  std::stringstream text;
  text << in.rdbuf();
  auto j = nlohmann::json::parse(text.str(), nullptr, false);
  if (j.is_discarded()) return Status::IoError(path + " is not JSON");
  return DecodePeerPull(j);
}

void RestoreServiceImpl::remove_pull(const std::string& collection, const std::string& name) {
  const std::string path = pull_path(collection, name);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    spdlog::warn("restore point {}/{}: removing {}: {}", collection, name, path,
                 std::strerror(errno));
  }
}

void RestoreServiceImpl::run_receive_point(RestorePointRecord rec, OperationRecord op,
                                           PeerPull pull, std::string region,
                                           std::shared_ptr<PointProgress> prog,
                                           std::shared_ptr<PeerReceive> rx, bool gc_held) {
  auto st = store_of(region);
  std::optional<JobError> err;
  uint64_t chunks_moved = 0, chunks_reused = 0, bytes = 0, looked_up = 0, compared = 0;
  uint64_t checkpoints = 0;
  bool stopped = false;
  // An abort (the sender ended the copy, or the point was deleted here) stops
  // the reads as a daemon stop does; the job then fails instead of pausing.
  auto stop = [&] { return stopping_.load() || rx->aborted.load(); };
  auto release = [&] {
    if (gc_held) release_gc(region);
    gc_held = false;
  };
  auto save = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    Status s = db_->save_point(rec);
    if (!s.ok()) spdlog::warn("restore point {}/{}: {}", rec.collection, rec.name, s.ToString());
  };
  if (!st) err = JobError{"RegionUnavailable", no_store(region).message()};
  std::vector<store::PointId> bases(pull.disks.size(), 0);
  if (!err && !pull.base_restore_point.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    auto b = peer_base_disks_locked(rec.collection, pull);
    if (b.ok()) {
      bases = std::move(b).value();
    } else {
      err = JobError{"CopyBaseUnavailable", b.status().message() + " (deleted meanwhile)"};
    }
  }
  const std::string context = ChangedContextOf(pull.base_source_restore_point);
  for (size_t i = 0; !err && i < pull.disks.size(); ++i) {
    const PeerPullDisk& pd = pull.disks[i];
    auto& d = rec.disk_restore_points[i];
    prog->started[i].store(true);
    if (d.status == "Succeeded" && d.store_point) {  // committed before a restart
      prog->to_copy[i].store(d.blocks_to_copy);
      prog->copied[i].store(d.blocks_copied);
      continue;
    }
    auto fail = [&](const std::string& what, const Status& s, const char* code = "CopyFailed") {
      if (s.code() == Code::kShutdown) {
        stopped = true;  // stays Creating: the next start resumes it
        d.status = "InProgress";
      } else {
        d.status = "Failed";
      }
      err = JobError{s.code() == Code::kShutdown ? "Interrupted" : code,
                     "disk '" + d.disk + "': " + what + s.message()};
    };
    store::PointParams pp;
    pp.size = pd.size_bytes;
    pp.chunk_size = pd.chunk_size;
    pp.tag = DiskPointId(rec.collection, rec.name, d.disk);
    // A changed list starts from the base's tree (the writer pins it): the
    // slots not listed keep the base's chunks.
    pp.parent = pd.changed ? bases[i] : 0;
    if (pp.parent) {  // the base's row must name the base's own store point
      auto own = OpenDiskPoint(*st, pp.parent,
                               DiskPointId(rec.collection, pull.base_restore_point, d.disk));
      if (!own.ok()) {
        fail("the copy base " + pull.base_restore_point + ": ", own.status(),
             "CopyBaseUnavailable");
        break;
      }
    }
    auto target = StoreChunkTarget::Begin(st, pp);
    if (!target.ok()) {
      fail(pd.changed ? "starting from the copy base " + pull.base_restore_point + ": " : "",
           target.status(), pd.changed ? "CopyBaseUnavailable" : "CopyFailed");
      break;
    }
    prog->to_copy[i].store(pd.chunks.size());
    NbdSource nbd(pd.uri, options_.peer_tls_dir, options_.peer_deadline_seconds,
                  pd.changed ? context : std::string());
    // Its retry waits end at an abort or a stop (wake_naps), not after the backoff.
    nbd.set_nap([&](std::chrono::milliseconds ms) { nap(ms, stop); });
    nbd.set_uri_source([rx, i] {
      std::lock_guard<std::mutex> lock(rx->mu);
      return rx->uris[i];
    });
    Status s;
    if (pd.changed) {
      // What changed since the base, as the sender's grant export answers it
      // (rpoint:changed, a tree diff there): it must be exactly the listed
      // slots, or the copy fails rather than keep a base chunk by mistake.
      fault::Action a = fault::Hit("peer.changed");
      if (a.error) s = Status::FromErrno(a.error, "asking " + context);
      auto dirty = s.ok() ? nbd.dirty_extents(pd.size_bytes, stop)
                          : Result<std::vector<std::pair<uint64_t, uint64_t>>>(s);
      if (!dirty.ok()) {
        target.value()->abandon();
        if (dirty.status().code() == Code::kNotFound) {
          fail("",
               Status::NotFound(dirty.status().message() + ": its base " +
                                pull.base_source_restore_point +
                                " is gone there; copy the point again (it then sends "
                                "full lists or starts from another base)"),
               "CopyBaseUnavailable");
        } else {
          fail("asking " + context + ": ", dirty.status());
        }
        break;
      }
      SlotRuns runs;
      for (const auto& [off, len] : dirty.value()) AddSlotRun(&runs, off, len, pd.chunk_size);
      size_t k = 0;
      std::optional<uint64_t> bad;
      for (const auto& [first, end] : runs) {
        for (uint64_t slot = first; slot < end && !bad; ++slot, ++k) {
          if (k >= pd.chunks.size() || pd.chunks[k].first != slot) bad = slot;
        }
      }
      if (!bad && k != pd.chunks.size()) bad = pd.chunks[k].first;
      if (bad) {
        target.value()->abandon();
        fail("", Status::IoError("the changed list and " + context + " disagree at slot " +
                                 std::to_string(*bad)));
        break;
      }
      ++compared;
    }
    // Lookups only for the listed data slots: with a base, the change.
    std::vector<store::Digest> digests;
    digests.reserve(pd.chunks.size());
    for (const auto& c : pd.chunks) {
      if (!c.second.is_zero()) digests.push_back(c.second);
    }
    looked_up += digests.size();
    auto held = target.value()->has(digests);
    if (!held.ok()) {
      target.value()->abandon();
      fail("", held.status());
      break;
    }
    // First every slot this region can fill alone: holes, and chunks it
    // holds (other points', or the checkpoints of a run a restart
    // interrupted). Naming them puts them in the writer's references, so the
    // GC a resumed run held back may run from here on.
    uint64_t done = 0;
    std::vector<size_t> to_read;
    for (size_t k = 0, h = 0; s.ok() && k < pd.chunks.size(); ++k) {
      const auto& [slot, digest] = pd.chunks[k];
      if (digest.is_zero()) {  // data in the base, a hole now
        s = target.value()->put_hole(slot);
        if (s.ok()) ++done;
        continue;
      }
      if (held.value()[h++]) {
        s = target.value()->reuse(slot, digest);
        if (s.ok()) {
          ++chunks_reused;
          ++done;
          continue;
        }
        if (s.code() != Code::kNotFound) break;
        s = Status::Ok();  // collected meanwhile: read it after all
      }
      to_read.push_back(k);
    }
    release();
    prog->copied[i].store(std::max(prog->copied[i].load(), done));
    // Then the rest over NBD, checkpointed every 16 MiB or second: a restart
    // of either host (or a cut) later re-reads at most that much.
    std::vector<char> buf(pd.chunk_size);
    uint64_t since_checkpoint = 0;
    auto last_checkpoint = std::chrono::steady_clock::now();
    for (size_t k : to_read) {
      if (!s.ok()) break;
      if (stop()) {
        s = Status::Shutdown("daemon stopping");
        break;
      }
      const auto& [slot, digest] = pd.chunks[k];
      fault::Action a = fault::Hit("peer.chunk");
      if (a.error) {
        s = Status::FromErrno(a.error, "receiving chunk of slot " + std::to_string(slot));
        break;
      }
      uint64_t len = std::min<uint64_t>(pd.chunk_size, pd.size_bytes - slot * pd.chunk_size);
      s = nbd.read(slot * pd.chunk_size, len, buf.data(), stop);
      // put() re-hashes: what arrived must be what the sender's tree names.
      if (s.ok()) s = target.value()->put(slot, digest, buf.data(), len);
      if (!s.ok()) break;
      ++chunks_moved;
      ++done;
      bytes += len;
      since_checkpoint += len;
      rx->moved[i].fetch_add(len);
      prog->copied[i].store(std::max(prog->copied[i].load(), done));
      auto now = std::chrono::steady_clock::now();
      if (since_checkpoint >= (16u << 20) || now - last_checkpoint >= std::chrono::seconds(1)) {
        s = target.value()->checkpoint();
        if (!s.ok()) break;
        ++checkpoints;
        since_checkpoint = 0;
        last_checkpoint = now;
        // The chunks so far are durable objects of the region: record the
        // progress (a resumed run finds them by has()).
        d.status = "InProgress";
        d.blocks_to_copy = pd.chunks.size();
        d.blocks_copied = done;
        save();
      }
    }
    if (!s.ok()) {
      // Stopping: what it read is kept for the next start; aborted: it goes.
      if (s.code() == Code::kShutdown && !rx->aborted.load()) (void)target.value()->checkpoint();
      target.value()->abandon();
      fail("", s);
      break;
    }
    auto info = target.value()->commit();
    if (!info.ok()) {
      fail("", info.status());
      break;
    }
    d.store_point = info->id;
    d.parent_store_point = pp.parent;
    d.bytes_stored = rx->moved[i].load();
    d.blocks_to_copy = pd.chunks.size();
    d.blocks_copied = pd.chunks.size();
    d.completion_percent = 100;
    d.status = "Succeeded";
    // Named by the record at once: a restart resumes after this disk, and a
    // copy that then fails deletes it.
    save();
  }
  release();
  const bool aborted = rx->aborted.load();
  if (aborted) {
    std::lock_guard<std::mutex> lock(rx->mu);
    err = rx->abort_error;
    stopped = false;
  }
  if (stopped) {
    spdlog::info("restore point {}/{}: rpointd stopping: receiving it resumes at the next start",
                 rec.collection, rec.name);
    save();
    std::lock_guard<std::mutex> lock(mu_);
    end_job_locked(rec.collection + "/" + rec.name);
    return;
  }
  if (!err) err = write_manifest(*st, rec);
  nlohmann::json result = {{"bytesMoved", bytes},
                           {"chunksMoved", chunks_moved},
                           {"chunksReused", chunks_reused},
                           {"chunksLookedUp", looked_up},
                           {"disksComparedWithBase", compared},
                           {"checkpoints", checkpoints}};
  if (!pull.base_restore_point.empty()) result["base"] = pull.base_restore_point;
  remove_pull(rec.collection, rec.name);
  finish_copy(rec, op, err, st.get(), std::move(result));
  if (aborted && st) request_gc(region);  // what it had checkpointed is garbage now
}

bool RestoreServiceImpl::abort_receive_locked(const std::string& key, const JobError& why) {
  auto it = receiving_.find(key);
  if (it == receiving_.end()) return false;
  {
    std::lock_guard<std::mutex> lock(it->second->mu);
    if (!it->second->aborted.load()) it->second->abort_error = why;  // the first reason stays
  }
  it->second->aborted.store(true);
  wake_naps();  // its NBD source's retry waits
  return true;
}

bool RestoreServiceImpl::wait_job_end_locked(std::unique_lock<std::mutex>& lock,
                                             const std::string& key,
                                             std::chrono::milliseconds limit) {
  // A job notices its stop between two reads or polls (an NBD read or a peer
  // call waits for its answer; its naps wake at once): well under the limits
  // callers give.
  return job_ended_.wait_for(lock, limit, [&] { return !live_points_.count(key); });
}

void RestoreServiceImpl::end_job_locked(const std::string& key) {
  live_points_.erase(key);
  receiving_.erase(key);
  job_ended_.notify_all();
}

void RestoreServiceImpl::nap(std::chrono::milliseconds ms, const std::function<bool()>& stop) {
  std::unique_lock<std::mutex> lock(wake_mu_);
  wake_.wait_for(lock, ms, stop);
}

void RestoreServiceImpl::wake_naps() {
  // Under wake_mu_: a nap between its check of `stop` and its wait sees the
  // flag set before this (the callers set it first).
  std::lock_guard<std::mutex> lock(wake_mu_);
  wake_.notify_all();
}

Result<std::optional<PeerPointState>> RestoreServiceImpl::abort_peer_receive(
    const std::string& collection, const std::string& name, const PeerAbort& abort) {
  using Out = std::optional<PeerPointState>;
  const std::string key = collection + "/" + name;
  std::unique_lock<std::mutex> lock(mu_);
  auto p = db_->get_point(collection, name);
  if (!p.ok()) return p.status();
  if (!p.value()) {
    return Status::NotFound("restore point '" + name + "' not found in collection '" + collection +
                            "'");
  }
  if (p.value()->source_restore_point != abort.source_restore_point) {
    return Status::Conflict("restore point " + PointId(collection, name) + " is a copy of " +
                            p.value()->source_restore_point + ", not of " +
                            abort.source_restore_point);
  }
  if (p.value()->provisioning_state == "Creating") {
    JobError why{abort.code, "the sending host ended the copy: " + abort.message};
    if (!abort_receive_locked(key, why)) {
      return Status::Conflict("restore point " + PointId(collection, name) +
                              " is not being received right now (it resumes after a restart): "
                              "retry the abort");
    }
    spdlog::warn("restore point {}/{}: the sending host ends its copy: {}: {}", collection, name,
                 abort.code, abort.message);
    // Short of the sender's 10 s call timeout: a job that takes longer still
    // ends as asked; the answer then shows it Creating.
    if (wait_job_end_locked(lock, key, std::chrono::seconds(8))) {
      p = db_->get_point(collection, name);
      if (!p.ok()) return p.status();
      if (!p.value()) return Out();
    }
  }
  if (p.value()->provisioning_state == "Succeeded") {
    return Status::Conflict("restore point " + PointId(collection, name) +
                            " is Succeeded here: its copy completed before the abort came; "
                            "delete it through this host's API");
  }
  const bool remove = abort.delete_point && p.value()->provisioning_state == "Failed";
  lock.unlock();
  if (remove) {
    Status s = delete_restore_point(collection, name);
    if (!s.ok() && s.code() != Code::kNotFound) return s;
    spdlog::info("restore point {}/{}: deleted, as the sending host canceled its copy", collection,
                 name);
    return Out();
  }
  auto state = peer_point_state(collection, name);
  if (!state.ok()) return state.status();
  return Out(std::move(state).value());
}

Status RestoreServiceImpl::tell_peer_abort(const std::string& region, const std::string& collection,
                                           const std::string& name, const PeerAbort& abort,
                                           std::chrono::seconds budget) {
  const RegionSpec* peer = peer_region(region);
  if (!peer || !peer_link_) return Status::Unsupported("region '" + region + "' has no peer");
  const auto until = std::chrono::steady_clock::now() + budget;
  auto backoff = std::chrono::milliseconds(200);
  for (;;) {
    auto r = peer_link_->call(peer->peer, "POST", PeerPath(collection, name) + "/abort",
                              EncodePeerAbort(abort));
    // NotFound: the peer holds no such point (the post never arrived).
    if (r.ok() || r.status().code() == Code::kNotFound) return Status::Ok();
    if (r.status().code() != Code::kIoError || stopping_.load() ||
        std::chrono::steady_clock::now() + backoff > until) {
      return r.status();
    }
    nap(backoff, [&] { return stopping_.load(); });
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(5));
  }
}

Result<PeerPointState> RestoreServiceImpl::peer_point_state(const std::string& collection,
                                                            const std::string& name) {
  auto p = get_restore_point(collection, name);
  if (!p.ok()) return p.status();
  PeerPointState s;
  s.provisioning_state = p->provisioning_state;
  s.error_code = p->error_code;
  s.error_message = p->error_message;
  std::shared_ptr<PeerReceive> rx;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = receiving_.find(collection + "/" + name);
    if (it != receiving_.end()) rx = it->second;
  }
  for (size_t i = 0; i < p->disk_restore_points.size(); ++i) {
    const auto& d = p->disk_restore_points[i];
    uint64_t b = rx && i < rx->moved.size() ? rx->moved[i].load() : d.bytes_stored;
    s.disks.push_back({d.disk, d.blocks_to_copy, d.blocks_copied, b});
  }
  if (p->provisioning_state == "Succeeded") {
    // What the copy looked up, as its operation recorded it.
    std::lock_guard<std::mutex> lock(mu_);
    auto o = db_->get_operation(p->operation_id);
    if (o.ok() && o.value() && o.value()->result.is_object()) {
      s.chunks_looked_up = o.value()->result.value("chunksLookedUp", uint64_t{0});
    }
  }
  return s;
}

}  // namespace rpoint
