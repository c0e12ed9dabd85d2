// RestoreService as an ExportResolver: "{collection}/{point}/{disk}" names
// of Succeeded disk restore points, served read-only by store::PointDevice,
// with the metadata contexts rpoint:changed:{collection}/{point}: the blocks
// that differ from another Succeeded point of the same disk in the same
// region (any collection; earlier or later), by chunk digest.
#include <spdlog/spdlog.h>

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

}  // namespace

std::vector<std::string> RestoreServiceImpl::meta_contexts(const std::string& export_name) {
  std::vector<std::string> out;
  auto parts = Split(export_name, '/');
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
  if (parts.size() != 3 || name.rfind(kChangedPrefix, 0) != 0) return nullptr;
  auto ref = Split(name.substr(std::string(kChangedPrefix).size()), '/');
  if (ref.size() != 2) return nullptr;
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
  if (!st) return nullptr;
  auto a = st->open_point(self->store_point);
  auto b = st->open_point(other->store_point);
  if (!a.ok() || !b.ok()) {
    spdlog::warn("export {}: {}: {}", export_name, name,
                 (a.ok() ? b.status() : a.status()).ToString());
    return nullptr;
  }
  return std::make_shared<ChangedContext>(name, std::move(a).value(), std::move(b).value());
}

}  // namespace rpoint
