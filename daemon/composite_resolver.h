// CompositeResolver: the one ExportResolver the NBD server sees, over the
// managed disks (export name = disk name), the restore points' read-only
// exports ("{collection}/{restorePoint}/{disk}") and access grants (a 64-hex
// token, restore/access_grants.h). Disk names cannot contain '/' and are at
// most 63 characters, so a name with a '/' goes to the restore points, a
// token-shaped one to the grants and any other to the disks: none can shadow
// another.
//
// Thread-safety: as safe as the resolvers (all are safe from any thread).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/block_device.h"
#include "restore/access_grants.h"

namespace rpoint {

class CompositeResolver final : public ExportResolver {
 public:
  CompositeResolver(ExportResolver& disks, ExportResolver& restore_points, ExportResolver& grants)
      : disks_(disks), restore_points_(restore_points), grants_(grants) {}

  std::shared_ptr<BlockDevice> find_export(const std::string& name) override {
    return of(name).find_export(name);
  }

  // A live disk's rpoint:changed: contexts come from the restore service,
  // which knows each collection's tracking base of the disk.
  std::vector<std::string> meta_contexts(const std::string& export_name) override {
    ExportResolver& r = of(export_name);
    return (&r == &disks_ ? restore_points_ : r).meta_contexts(export_name);
  }
  std::shared_ptr<MetaContext> open_meta_context(const std::string& export_name,
                                                 const std::string& name) override {
    ExportResolver& r = of(export_name);
    return (&r == &disks_ ? restore_points_ : r).open_meta_context(export_name, name);
  }

  Refusal refuse(const std::string& name) override { return of(name).refuse(name); }

  // Grants are never listed: their names are secrets.
  std::vector<ExportInfo> list_exports() override {
    std::vector<ExportInfo> all = disks_.list_exports();
    for (auto& e : restore_points_.list_exports()) all.push_back(std::move(e));
    return all;
  }

 private:
  ExportResolver& of(const std::string& name) {
    if (name.find('/') != std::string::npos) return restore_points_;
    if (AccessGrants::IsTokenName(name)) return grants_;
    return disks_;
  }

  ExportResolver& disks_;
  ExportResolver& restore_points_;
  ExportResolver& grants_;
};

// What a listener serving only access grants resolves (access.tcp_grants_only):
// tokens, nothing listed, every other name refused as such.
class GrantsOnlyResolver final : public ExportResolver {
 public:
  explicit GrantsOnlyResolver(ExportResolver& grants) : grants_(grants) {}

  std::shared_ptr<BlockDevice> find_export(const std::string& name) override {
    return AccessGrants::IsTokenName(name) ? grants_.find_export(name) : nullptr;
  }
  Refusal refuse(const std::string& name) override {
    if (AccessGrants::IsTokenName(name)) return grants_.refuse(name);
    return {"this listener serves only access grant tokens (beginGetAccess)", {}};
  }
  std::vector<ExportInfo> list_exports() override { return {}; }

 private:
  ExportResolver& grants_;
};

}  // namespace rpoint
