// CompositeResolver: the one ExportResolver the NBD server sees, over the
// managed disks (export name = disk name) and the restore points' read-only
// exports ("{collection}/{restorePoint}/{disk}"). Disk names cannot contain
// '/', so a name with one goes to the restore points and any other to the
// disks: neither side can shadow the other.
//
// Thread-safety: as safe as the two resolvers (both are safe from any thread).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/block_device.h"

namespace rpoint {

class CompositeResolver final : public ExportResolver {
 public:
  CompositeResolver(ExportResolver& disks, ExportResolver& restore_points)
      : disks_(disks), restore_points_(restore_points) {}

  std::shared_ptr<BlockDevice> find_export(const std::string& name) override {
    return side(name).find_export(name);
  }

  std::vector<std::string> meta_contexts(const std::string& export_name) override {
    return side(export_name).meta_contexts(export_name);
  }
  std::shared_ptr<MetaContext> open_meta_context(const std::string& export_name,
                                                 const std::string& name) override {
    return side(export_name).open_meta_context(export_name, name);
  }

  std::vector<ExportInfo> list_exports() override {
    std::vector<ExportInfo> all = disks_.list_exports();
    for (auto& e : restore_points_.list_exports()) all.push_back(std::move(e));
    return all;
  }

 private:
  ExportResolver& side(const std::string& name) {
    return name.find('/') == std::string::npos ? disks_ : restore_points_;
  }

  ExportResolver& disks_;
  ExportResolver& restore_points_;
};

}  // namespace rpoint
