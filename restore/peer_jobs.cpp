// Regions on other hosts (restore/peer_link.h): both halves of a copy to a
// peer region. The sending host (run_send_point) shares each source disk
// point as an NBD-over-TLS access grant, posts the point with its chunk
// digests to the peer, and polls its progress; the keeping host
// (receive_restore_point / run_receive_point) reads with libnbd only the
// chunks its region lacks, re-hashes each (StoreChunkTarget::put), commits,
// writes the manifest and records the point Succeeded. A point is Succeeded on
// the sending host only once the peer says its copy is: a crash or a cut
// anywhere leaves it Failed (or still retrying), never Succeeded with data
// missing on the peer.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "common/fault_injection.h"
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

// Data slots of a disk point with their digests, in slot order.
Result<std::vector<std::pair<uint64_t, store::Digest>>> DataChunks(store::PointReader& r) {
  std::vector<std::pair<uint64_t, store::Digest>> out;
  const uint64_t slots = r.slots();
  for (uint64_t first = 0; first < slots; first += store::kFanout) {
    uint32_t count = static_cast<uint32_t>(std::min<uint64_t>(store::kFanout, slots - first));
    auto locs = r.resolve(first, count);
    if (!locs.ok()) return locs.status();
    for (uint32_t i = 0; i < count; ++i) {
      const auto& l = locs.value()[i];
      if (l.state != store::PointReader::Location::kHole) out.emplace_back(first + i, l.digest);
    }
  }
  return out;
}

}  // namespace

const RegionSpec* RestoreServiceImpl::peer_region(const std::string& region) const {
  for (const auto& r : regions_) {
    if (r.name == region && !r.peer.empty()) return &r;
  }
  return nullptr;
}

Status RestoreServiceImpl::kept_here(const std::string& region, const std::string& collection,
                                     const std::string& name) const {
  const RegionSpec* peer = peer_region(region);
  if (!peer) return Status::Ok();
  return Status::Conflict("restore point " + PointId(collection, name) + " is in region '" +
                          region + "', kept by peer " + peer->peer +
                          ": its data is there; use that host's API");
}

Result<std::pair<CollectionRecord, bool>> RestoreServiceImpl::put_peer_collection(
    const std::string& name, const std::string& source_vm, const std::string& region) {
  Status s = ValidateResourceName("collection", name);
  if (s.ok()) s = ValidateResourceName("VM", source_vm);
  if (!s.ok()) return s;
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
  live_points_.erase(rec.collection + "/" + rec.name);
  receiving_.erase(rec.collection + "/" + rec.name);
}

// ---- the sending host ----

void RestoreServiceImpl::run_send_point(RestorePointRecord rec, OperationRecord op,
                                        RestorePointRecord src, std::string src_region,
                                        std::string region, std::shared_ptr<PointProgress> prog) {
  const RegionSpec* peer = peer_region(region);
  auto src_st = store_of(src_region);
  PointSharer* sharer = sharer_.load();
  std::optional<JobError> err;
  const auto deadline = std::chrono::seconds(options_.peer_deadline_seconds);
  PeerPull pull;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto c = db_->get_collection(rec.collection);
    if (c.ok() && c.value()) pull.source_vm = c.value()->source_vm;
  }
  pull.source_restore_point = rec.source_restore_point;
  pull.consistency_mode = rec.consistency_mode;
  pull.time_created = rec.time_created;
  pull.exclude_disks = rec.exclude_disks;
  pull.source_metadata = rec.source_metadata;
  std::vector<std::string> shared;
  if (!peer || !src_st)
    err = JobError{"RegionUnavailable", "a region of the copy is not configured"};
  if (!err && !sharer) {
    err = JobError{"PeerCopyUnavailable", "this daemon cannot share points with peers"};
  }
  for (size_t i = 0; !err && i < rec.disk_restore_points.size(); ++i) {
    const auto& sd = src.disk_restore_points[i];
    auto reader = src_st->open_point(sd.store_point);
    Result<std::vector<std::pair<uint64_t, store::Digest>>> chunks =
        reader.ok() ? DataChunks(*reader.value())
                    : Result<std::vector<std::pair<uint64_t, store::Digest>>>(reader.status());
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
    PeerPullDisk pd;
    pd.disk = sd.disk;
    pd.size_bytes = reader.value()->size();
    pd.granularity = sd.granularity;
    pd.chunk_size = reader.value()->chunk_size();
    pd.uri = uri.value();
    pd.chunks = std::move(chunks).value();
    prog->started[i].store(true);
    prog->to_copy[i].store(pd.chunks.size());
    pull.disks.push_back(std::move(pd));
  }

  // Retried with backoff while the peer cannot be reached; an answer that
  // names an error ends the copy.
  const std::string path = PeerPath(rec.collection, rec.name);
  auto backoff = std::chrono::milliseconds(200);
  auto last_answer = std::chrono::steady_clock::now();
  bool posted = false;
  nlohmann::json result = {{"peer", peer ? peer->peer : ""}};
  while (!err) {
    if (stopping_.load()) {
      err = JobError{"Interrupted", "rpointd stopped during the copy to peer " + peer->peer};
      break;
    }
    Result<nlohmann::json> r =
        posted ? peer_link_->call(peer->peer, "GET", path, nullptr)
               : peer_link_->call(peer->peer, "POST", path, EncodePeerPull(pull));
    if (!r.ok()) {
      if (r.status().code() != Code::kIoError) {
        err = JobError{"PeerCopyFailed", r.status().message()};
        break;
      }
      if (std::chrono::steady_clock::now() - last_answer > deadline) {
        err = JobError{"PeerUnreachable", r.status().message() + " (gave up after " +
                                              std::to_string(deadline.count()) +
                                              " s without an answer)"};
        break;
      }
      spdlog::warn("restore point {}/{}: peer {}: {}; retrying in {} ms", rec.collection, rec.name,
                   peer->peer, r.status().message(), backoff.count());
      std::this_thread::sleep_for(backoff);
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
    uint64_t bytes = 0;
    for (size_t i = 0; i < state->disks.size() && i < prog->copied.size(); ++i) {
      prog->to_copy[i].store(state->disks[i].to_copy);
      prog->copied[i].store(state->disks[i].copied);
      bytes += state->disks[i].bytes_moved;
    }
    result["bytesMoved"] = bytes;
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
      err = JobError{"PeerCopyFailed", "peer " + peer->peer + ": the copy there is " +
                                           state->provisioning_state + ": " + state->error_code +
                                           ": " + state->error_message};
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  for (const auto& disk : shared) sharer->unshare(src.collection, src.name, disk);
  finish_copy(rec, op, err, nullptr, std::move(result));
}

// ---- the keeping host ----

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
    return Status::Conflict("collection '" + collection + "' is not in a region kept on this host");
  }
  auto existing = db_->get_point(collection, name);
  if (!existing.ok()) return existing.status();
  if (existing.value()) {
    RestorePointRecord p = *existing.value();
    if (p.source_restore_point == pull.source_restore_point && p.provisioning_state != "Deleting") {
      overlay(p);
      std::string op = p.operation_id;
      return Started<RestorePointRecord>{std::move(p), op, false};
    }
    return Status::Conflict("restore point '" + name + "' already exists in collection '" +
                            collection + "'");
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
    d.full = true;
    d.status = "Pending";
    rec.disk_restore_points.push_back(d);
  }
  OperationRecord op = new_operation("CopyRestorePoint", PointId(collection, name));
  rec.operation_id = op.id;
  s = db_->save_point(rec, &op);
  if (!s.ok()) return s;
  auto prog = std::make_shared<PointProgress>(rec.disk_restore_points.size());
  auto moved = std::make_shared<std::vector<std::atomic<uint64_t>>>(pull.disks.size());
  live_points_[collection + "/" + name] = prog;
  receiving_[collection + "/" + name] = moved;
  lock.unlock();
  spdlog::info("restore point {}/{}: receiving {} from a peer, operation {}", collection, name,
               pull.source_restore_point, op.id);
  spawn([this, rec, op, pull, region, prog, moved] {
    run_receive_point(rec, op, pull, region, prog, moved);
  });
  return Started<RestorePointRecord>{rec, op.id, true};
}

void RestoreServiceImpl::run_receive_point(
    RestorePointRecord rec, OperationRecord op, PeerPull pull, std::string region,
    std::shared_ptr<PointProgress> prog,
    std::shared_ptr<std::vector<std::atomic<uint64_t>>> moved) {
  auto st = store_of(region);
  std::optional<JobError> err;
  uint64_t chunks_moved = 0, chunks_reused = 0, bytes = 0;
  auto stop = [&] { return stopping_.load(); };
  if (!st) err = JobError{"RegionUnavailable", "region '" + region + "' is not configured"};
  for (size_t i = 0; !err && i < pull.disks.size(); ++i) {
    const PeerPullDisk& pd = pull.disks[i];
    auto& d = rec.disk_restore_points[i];
    auto fail = [&](const std::string& what, const Status& s) {
      d.status = "Failed";
      err = JobError{s.code() == Code::kShutdown ? "Interrupted" : "CopyFailed",
                     "disk '" + d.disk + "': " + what + s.message()};
    };
    store::PointParams pp;
    pp.size = pd.size_bytes;
    pp.chunk_size = pd.chunk_size;
    pp.tag = DiskPointId(rec.collection, rec.name, d.disk);
    auto target = StoreChunkTarget::Begin(st, pp);
    if (!target.ok()) {
      fail("", target.status());
      break;
    }
    prog->started[i].store(true);
    prog->to_copy[i].store(pd.chunks.size());
    std::vector<store::Digest> digests;
    digests.reserve(pd.chunks.size());
    for (const auto& c : pd.chunks) digests.push_back(c.second);
    auto held = target.value()->has(digests);
    if (!held.ok()) {
      target.value()->abandon();
      fail("", held.status());
      break;
    }
    NbdSource nbd(pd.uri, options_.peer_tls_dir, options_.peer_deadline_seconds);
    std::vector<char> buf(pd.chunk_size);
    Status s;
    for (size_t k = 0; s.ok() && k < pd.chunks.size(); ++k) {
      if (stop()) {
        s = Status::Shutdown("daemon stopping");
        break;
      }
      const auto& [slot, digest] = pd.chunks[k];
      if (held.value()[k]) {
        s = target.value()->reuse(slot, digest);
        if (s.ok()) {
          ++chunks_reused;
          prog->copied[i].fetch_add(1);
          continue;
        }
        if (s.code() != Code::kNotFound) break;
        s = Status::Ok();  // collected meanwhile: read it after all
      }
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
      bytes += len;
      (*moved)[i].fetch_add(len);
      prog->copied[i].fetch_add(1);
    }
    if (!s.ok()) {
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
    d.bytes_stored = (*moved)[i].load();
    d.blocks_to_copy = pd.chunks.size();
    d.blocks_copied = pd.chunks.size();
    d.completion_percent = 100;
    d.status = "Succeeded";
  }
  if (!err) err = write_manifest(*st, rec);
  finish_copy(
      rec, op, err, st.get(),
      {{"bytesMoved", bytes}, {"chunksMoved", chunks_moved}, {"chunksReused", chunks_reused}});
}

Result<PeerPointState> RestoreServiceImpl::peer_point_state(const std::string& collection,
                                                            const std::string& name) {
  auto p = get_restore_point(collection, name);
  if (!p.ok()) return p.status();
  PeerPointState s;
  s.provisioning_state = p->provisioning_state;
  s.error_code = p->error_code;
  s.error_message = p->error_message;
  std::shared_ptr<std::vector<std::atomic<uint64_t>>> moved;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = receiving_.find(collection + "/" + name);
    if (it != receiving_.end()) moved = it->second;
  }
  for (size_t i = 0; i < p->disk_restore_points.size(); ++i) {
    const auto& d = p->disk_restore_points[i];
    uint64_t b = moved && i < moved->size() ? (*moved)[i].load() : d.bytes_stored;
    s.disks.push_back({d.disk, d.blocks_to_copy, d.blocks_copied, b});
  }
  return s;
}

}  // namespace rpoint
