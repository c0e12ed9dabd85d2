// RestoreService as an ExportResolver: "{collection}/{point}/{disk}" names
// of Succeeded disk restore points, served read-only by store::PointDevice,
// with the metadata contexts rpoint:changed:{collection}/{point}: the blocks
// that differ from another Succeeded point of the same disk in the same
// region (any collection; earlier or later), by chunk digest.
#include <spdlog/spdlog.h>

#include "disks/disk_service.h"
#include "engine/change_tracker.h"
#include "engine/file_disk.h"
#include "engine/sparse_bitmap.h"
#include "restore/restore_service_impl.h"

namespace rpoint {

// ---------------------------------------------------------------------------
// Exports

std::optional<RestoreServiceImpl::DiskPointRef> RestoreServiceImpl::disk_point_locked(
    const std::string& collection, const std::string& point, const std::string& disk) {
  auto coll = db_->get_collection(collection);
  if (!coll.ok() || !coll.value()) return std::nullopt;
  auto p = db_->get_point(collection, point);
  if (!p.ok() || !p.value() || p.value()->provisioning_state != "Succeeded") return std::nullopt;
  for (const auto& d : p.value()->disk_restore_points) {
    if (d.disk == disk && d.store_point) {
      return DiskPointRef{coll.value()->region, d.store_point, d.granularity};
    }
  }
  return std::nullopt;
}

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
    auto ref = disk_point_locked(parts[0], parts[1], parts[2]);
    if (!ref) return nullptr;
    region = ref->region;
    sp = ref->store_point;
  }
  auto st = store_of(region);
  if (sp && !st) spdlog::warn("export {}: {}", name, no_store(region).message());
  if (!sp || !st) return nullptr;
  auto reader = OpenDiskPoint(*st, sp, DiskPointId(parts[0], parts[1], parts[2]));
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

// ---------------------------------------------------------------------------
// rpoint:changed: metadata contexts

namespace {

constexpr const char* kChangedPrefix = "rpoint:changed:";

// rpoint:changed:{collection}/{point} on one disk point export: a tree diff
// of the two pinned points (both stay readable while a client holds this).
class ChangedContext final : public MetaContext {
 public:
  ChangedContext(std::string name, std::shared_ptr<store::PointReader> self,
                 std::shared_ptr<store::PointReader> other)
      : name_(std::move(name)), self_(std::move(self)), other_(std::move(other)) {}
  const std::string& name() const override { return name_; }
  Result<std::vector<Extent>> extents(uint64_t offset, uint64_t length,
                                      size_t max_extents) override {
    return self_->changed_extents(*other_, offset, length, max_extents);
  }

 private:
  std::string name_;
  std::shared_ptr<store::PointReader> self_;
  std::shared_ptr<store::PointReader> other_;
};

// rpoint:changed:{collection}/{point} on a live disk export: the blocks its
// change tracker marked after the generation the point captured through (the
// collection's tracking base of the disk). Marks are durable before the
// writes they cover, so this survives a crash and never misses a written
// block (it may over-report: whole tracking blocks, and writes rewriting the
// same bytes). Asked on the disk's worker thread, per request: once the
// tracker has retired part of that history (the collection's later points
// retired it and no other collection needs it), requests fail (EIO, logged)
// rather than answer short.
class LiveChangedContext final : public MetaContext {
 public:
  LiveChangedContext(std::string name, std::shared_ptr<FileDisk> disk, uint64_t tracker_id,
                     uint64_t generation)
      : name_(std::move(name)),
        disk_(std::move(disk)),
        tracker_id_(tracker_id),
        generation_(generation) {}
  const std::string& name() const override { return name_; }
  Result<std::vector<Extent>> extents(uint64_t offset, uint64_t length,
                                      size_t max_extents) override {
    ChangeTracker* t = disk_->tracker();
    SparseBitmap bits;
    if (!t || t->id() != tracker_id_ || !t->changed_since(generation_, &bits)) {
      return Status::Conflict(name_ + ": the change tracker no longer holds the changes since " +
                              "that restore point (a later point retired them)");
    }
    std::vector<Extent> out;
    const uint64_t end = std::min(offset + length, disk_->size());
    const uint64_t g = t->granularity();
    uint64_t at = offset;
    while (at < end && out.size() < max_extents) {
      uint64_t b = at / g;
      bool dirty = b < bits.size() && bits.test(b);
      uint64_t next;
      if (dirty) {
        uint64_t e = b;
        while (e < bits.size() && bits.test(e) && e * g < end) ++e;
        next = e * g;
      } else {
        uint64_t e = b < bits.size() ? bits.find_next(b) : bits.size();
        next = e >= bits.size() ? end : e * g;
      }
      next = std::min(std::max(next, at + 1), end);
      uint32_t flags = dirty ? MetaContext::kDirty : 0;
      if (!out.empty() && out.back().flags == flags) {
        out.back().length += next - at;
      } else {
        out.push_back({next - at, flags});
      }
      at = next;
    }
    if (out.empty()) out.push_back({std::max<uint64_t>(1, end - offset), 0});
    return out;
  }

 private:
  std::string name_;
  std::shared_ptr<FileDisk> disk_;
  uint64_t tracker_id_;
  uint64_t generation_;
};

}  // namespace

std::optional<TrackingBase> RestoreServiceImpl::live_changed_base_locked(
    const std::string& disk, const std::string& collection, const std::string& point,
    const FileDisk& fd) {
  auto b = db_->tracking_base(disk, collection);
  if (!b.ok() || !b.value()) return std::nullopt;
  const TrackingBase& base = *b.value();
  ChangeTracker* t = fd.tracker();
  // Only the collection's latest point of the disk has its generation on
  // record; a base recorded before generations were (0) or of an earlier
  // disk of that name, or whose history was retired, cannot answer.
  if (base.retained || base.restore_point != point || base.generation == 0 || !t ||
      base.tracker_id != t->id() || !t->changed_since(base.generation, nullptr)) {
    return std::nullopt;
  }
  return base;
}

std::vector<std::string> RestoreServiceImpl::live_meta_contexts(const std::string& disk) {
  std::vector<std::string> out;
  auto fd = disks_.file_disk(disk);
  if (!fd) return out;
  std::lock_guard<std::mutex> lock(mu_);
  auto bases = db_->bases_of_disk(disk);
  if (!bases.ok()) return out;
  for (const auto& b : bases.value()) {
    if (live_changed_base_locked(disk, b.collection, b.restore_point, *fd)) {
      out.push_back(kChangedPrefix + b.collection + "/" + b.restore_point);
    }
  }
  return out;
}

std::vector<std::string> RestoreServiceImpl::meta_contexts(const std::string& export_name) {
  std::vector<std::string> out;
  auto parts = Split(export_name, '/');
  if (parts.size() == 1) return live_meta_contexts(export_name);
  if (parts.size() != 3) return out;
  std::lock_guard<std::mutex> lock(mu_);
  auto self = disk_point_locked(parts[0], parts[1], parts[2]);
  if (!self) return out;
  auto regions = collection_regions_locked();
  auto ps = db_->list_points("");
  if (!regions.ok() || !ps.ok()) return out;
  for (const auto& p : ps.value()) {
    if (p.provisioning_state != "Succeeded") continue;
    if (p.collection == parts[0] && p.name == parts[1]) continue;
    if (regions.value()[p.collection] != self->region) continue;
    for (const auto& d : p.disk_restore_points) {
      if (d.disk == parts[2] && d.store_point && d.granularity == self->granularity) {
        out.push_back(kChangedPrefix + p.collection + "/" + p.name);
      }
    }
  }
  return out;
}

std::shared_ptr<MetaContext> RestoreServiceImpl::open_meta_context(const std::string& export_name,
                                                                   const std::string& name) {
  auto parts = Split(export_name, '/');
  if ((parts.size() != 3 && parts.size() != 1) || name.rfind(kChangedPrefix, 0) != 0) {
    return nullptr;
  }
  auto ref = Split(name.substr(std::string(kChangedPrefix).size()), '/');
  if (ref.size() != 2) return nullptr;
  if (parts.size() == 1) {
    auto fd = disks_.file_disk(export_name);
    if (!fd) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    auto base = live_changed_base_locked(export_name, ref[0], ref[1], *fd);
    if (!base) {
      spdlog::info(
          "export {}: {} not offered: not the collection's latest point of the disk, "
          "or the change tracker no longer holds the changes since it",
          export_name, name);
      return nullptr;
    }
    return std::make_shared<LiveChangedContext>(name, fd, base->tracker_id, base->generation);
  }
  std::optional<DiskPointRef> self, other;
  {
    std::lock_guard<std::mutex> lock(mu_);
    self = disk_point_locked(parts[0], parts[1], parts[2]);
    // The other point must hold this same disk: a foreign disk's point is not offered.
    other = disk_point_locked(ref[0], ref[1], parts[2]);
  }
  // Not offered against itself either, as meta_contexts() lists.
  if (!self || !other || (ref[0] == parts[0] && ref[1] == parts[1])) return nullptr;
  if (other->region != self->region || other->granularity != self->granularity) {
    spdlog::info("export {}: {} not offered: {}", export_name, name,
                 other->region != self->region ? "the point is in another region"
                                               : "the points have different chunk sizes");
    return nullptr;
  }
  auto st = store_of(self->region);
  if (!st) {
    spdlog::warn("export {}: {}", export_name, no_store(self->region).message());
    return nullptr;
  }
  auto a = OpenDiskPoint(*st, self->store_point, DiskPointId(parts[0], parts[1], parts[2]));
  auto b = OpenDiskPoint(*st, other->store_point, DiskPointId(ref[0], ref[1], parts[2]));
  if (!a.ok() || !b.ok()) {
    spdlog::warn("export {}: {}: {}", export_name, name,
                 (a.ok() ? b.status() : a.status()).ToString());
    return nullptr;
  }
  return std::make_shared<ChangedContext>(name, std::move(a).value(), std::move(b).value());
}

}  // namespace rpoint
