// Verify and restore jobs: re-hashing a point's objects; filling new disks
// from disk restore points (a disk, or every disk of a point plus the VM).
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>

#include "common/file_io.h"
#include "common/unique_fd.h"
#include "disks/disk_files.h"
#include "disks/disk_service.h"
#include "restore/restore_service_impl.h"
#include "store/point_reader.h"

namespace rpoint {

// ---------------------------------------------------------------------------
// Verify

Result<std::string> RestoreServiceImpl::start_verify(const std::string& collection,
                                                     const std::string& name) {
  if (stopping_.load()) return Status::Shutdown("rpointd is stopping");
  RestorePointRecord rec;
  std::string region;
  OperationRecord op;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = find_point_locked(collection, name);
    if (!found.ok()) return found.status();
    if (Status kept = kept_here(found.value().region, collection, name); !kept.ok()) return kept;
    region = std::move(found.value().region);
    rec = std::move(found.value().point);
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
    // Quarantine: damage found here is re-copied from the disk by its next
    // restore point (docs/store.md, "Verify"), which heals this point too.
    // The record must name this point's store point: verifying another
    // point's would report it intact.
    Status own =
        st ? OpenDiskPoint(*st, d.store_point, DiskPointId(rec.collection, rec.name, d.disk))
                 .status()
           : Status::NotFound("region");
    auto r = own.ok() ? st->verify(d.store_point, store::VerifyOptions{.quarantine = true})
                      : Result<store::VerifyReport>(own);
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
                                     uint64_t store_point, const std::string& disk_point_id,
                                     const std::function<void(uint64_t, uint64_t)>& progress) {
  auto reader = OpenDiskPoint(st, store_point, disk_point_id);
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
  // Pass 2: the runs in pieces of up to 4 MiB, handed out in disk order to
  // a few workers. Each reads its piece (PointReader::read: large O_DIRECT
  // preads of the packs, every chunk checked against its SHA-256) and writes it with one
  // pwrite, so hashing runs on every core while another worker waits for I/O.
  // Pieces are 4 KiB aligned (chunk boundaries), so they are written with
  // O_DIRECT: no copy into the page cache and no writeback to wait for at the
  // fdatasync. A filesystem refusing it (and a disk's unaligned tail) goes
  // through the page cache, with writeback started at once.
  UniqueFd dfd(::open(rec->path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
  constexpr uint64_t kPiece = 4u << 20;
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  for (const auto& [start, length] : runs) {
    for (uint64_t off = start; off < start + length; off += kPiece) {
      pieces.emplace_back(off, std::min(kPiece, start + length - off));
    }
  }
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0};
  std::mutex mu;
  Status failure;
  auto fail = [&](Status s) {
    std::lock_guard<std::mutex> lock(mu);
    if (failure.ok()) failure = std::move(s);
    next.store(pieces.size());  // the others stop at their next piece
  };
  auto work = [&] {
    // 4 KiB aligned for O_DIRECT.
    std::unique_ptr<char, decltype(&std::free)> mem(
        static_cast<char*>(std::aligned_alloc(4096, kPiece)), &std::free);
    if (!mem) return fail(Status::Internal("out of memory for the restore buffer"));
    char* const buf = mem.get();
    for (;;) {
      size_t i = next.fetch_add(1);
      if (i >= pieces.size()) return;
      if (stopping_.load()) return fail(Status::Shutdown("daemon stopping"));
      const auto [off, n] = pieces[i];
      Status s = r.read(off, n, buf, store::PointReader::ReadMode::kDirect);
      if (!s.ok()) return fail(s);
      size_t direct = 0;
      s = PwriteDirect(dfd.get(), fd.get(), buf, n, off, rec->path, "restore.fill", &direct);
      if (!s.ok()) return fail(s);
      if (direct < n) {
        (void)::sync_file_range(fd.get(), static_cast<off_t>(off + direct),
                                static_cast<off_t>(n - direct), SYNC_FILE_RANGE_WRITE);
      }
      progress(done.fetch_add(n) + n, total);
    }
  };
  const unsigned nthreads = std::max(2u, options_.copy_threads);
  std::vector<std::thread> threads;
  for (unsigned t = 1; t < nthreads && t < pieces.size(); ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  if (!failure.ok()) return failure;
  if (::fdatasync(fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + rec->path);
  return Status::Ok();
}

Result<std::string> RestoreServiceImpl::start_restore_disk(const std::string& disk,
                                                           const std::string& source_id) {
  if (stopping_.load()) return Status::Shutdown("rpointd is stopping");
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
    auto point = find_point_locked(c, rp);
    if (!point.ok()) return point.status();
    if (Status kept = kept_here(point.value().region, c, rp); !kept.ok()) return kept;
    region = point.value().region;
    const RestorePointRecord& p = point.value().point;
    bool found = false;
    for (const auto& d : p.disk_restore_points) {
      if (d.disk == src) {
        drp = d;
        found = true;
      }
    }
    if (!found) return Status::NotFound("disk restore point '" + source_id + "' not found");
    if (p.provisioning_state != "Succeeded") {
      return Status::Conflict("restore point '" + c + "/" + rp + "' is " + p.provisioning_state +
                              ", not Succeeded");
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
  std::string want = DiskPointId(c, rp, src);
  spawn([this, disk, drp, want, region, op, pct]() mutable {
    auto st = store_of(region);
    Status r =
        st ? fill_disk(disk, *st, drp.store_point, want,
                       [&](uint64_t done, uint64_t total) {
                         if (total)
                           pct->store(static_cast<int>(std::min<uint64_t>(99, done * 100 / total)));
                       })
           : no_store(region);
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
  if (stopping_.load()) return Status::Shutdown("rpointd is stopping");
  Status s = ValidateResourceName("VM", vm);
  if (!s.ok()) return s;
  RestorePointRecord rec;
  std::string region;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = find_point_locked(collection, name);
    if (!found.ok()) return found.status();
    if (Status kept = kept_here(found.value().region, collection, name); !kept.ok()) return kept;
    region = std::move(found.value().region);
    rec = std::move(found.value().point);
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
    Status r = st ? Status::Ok() : no_store(region);
    uint64_t total = 0;
    for (const auto& d : rec.disk_restore_points) total += d.size_bytes;
    uint64_t before = 0;
    for (size_t i = 0; i < targets.size() && r.ok(); ++i) {
      const auto& d = rec.disk_restore_points[i];
      r = fill_disk(
          targets[i], *st, d.store_point, DiskPointId(rec.collection, rec.name, d.disk),
          [&](uint64_t done, uint64_t t) {
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

}  // namespace rpoint
