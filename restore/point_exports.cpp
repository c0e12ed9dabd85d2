// RestoreService as an ExportResolver: "{collection}/{point}/{disk}" names
// of Succeeded disk restore points, served read-only by store::PointDevice.
#include <spdlog/spdlog.h>

#include "restore/restore_service_impl.h"

namespace rpoint {

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
