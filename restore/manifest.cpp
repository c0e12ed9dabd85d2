#include "restore/manifest.h"

#include <nlohmann/json.hpp>

#include "common/json_parse.h"
#include "common/json_raw.h"

namespace rpoint {
namespace {
constexpr int kManifestFormat = 1;
}  // namespace

std::string ManifestName(const std::string& collection, const std::string& point) {
  return collection + "~" + point;
}

std::string EncodeManifest(const CollectionRecord& c, const RestorePointRecord& p) {
  nlohmann::json disks = nlohmann::json::array();
  for (const auto& d : p.disk_restore_points) {
    disks.push_back({{"disk", d.disk},
                     {"sizeBytes", d.size_bytes},
                     {"granularity", d.granularity},
                     {"full", d.full},
                     {"storePoint", d.store_point},
                     {"parentStorePoint", d.parent_store_point},
                     {"blocksToCopy", d.blocks_to_copy},
                     {"blocksCopied", d.blocks_copied},
                     {"bytesStored", d.bytes_stored}});
  }
  nlohmann::json j = {
      {"format", kManifestFormat},
      {"collection",
       {{"name", c.name}, {"sourceVm", c.source_vm}, {"timeCreated", c.time_created}}},
      {"restorePoint",
       {{"name", p.name},
        {"timeCreated", p.time_created},
        {"consistencyMode", p.consistency_mode},
        {"excludeDisks", p.exclude_disks},
        {"cutPauseNs", p.cut_pause_ns},
        {"sourceMetadata", p.source_metadata},
        {"diskRestorePoints", disks}}}};
  // A copy names the point it came from (absent for a cut point, so the
  // manifests of cut points read as before).
  if (!p.source_restore_point.empty()) {
    j["restorePoint"]["sourceRestorePoint"] = p.source_restore_point;
  }
  return DumpJson(j, 2) + "\n";
}

Result<std::pair<CollectionRecord, RestorePointRecord>> DecodeManifest(const std::string& text) {
  // A region can come from another host: its files get the same strict,
  // depth-bounded parser as any input from outside (the manifest wraps the VM
  // configuration a few levels down, hence the doubled bound, as restore_db's).
  // The VM configuration is kept as the exact text it was given in.
  auto parsed = ParseJsonKeepingRaw(text, {"restorePoint", "sourceMetadata", "configuration"},
                                    2 * kJsonMaxDepth);
  if (!parsed.ok()) return parsed.status();
  try {
    nlohmann::json j = std::move(parsed).value();
    if (j.value("format", 0) != kManifestFormat) {
      return Status::InvalidArgument("manifest format is not " + std::to_string(kManifestFormat));
    }
    const auto& jc = j.at("collection");
    const auto& jp = j.at("restorePoint");
    CollectionRecord c;
    c.name = jc.at("name").get<std::string>();
    c.source_vm = jc.at("sourceVm").get<std::string>();
    c.time_created = jc.at("timeCreated").get<std::string>();
    RestorePointRecord p;
    p.collection = c.name;
    p.name = jp.at("name").get<std::string>();
    p.time_created = jp.at("timeCreated").get<std::string>();
    p.consistency_mode = jp.at("consistencyMode").get<std::string>();
    p.exclude_disks = jp.at("excludeDisks").get<std::vector<std::string>>();
    p.cut_pause_ns = jp.value("cutPauseNs", int64_t{-1});
    p.source_metadata = jp.at("sourceMetadata");
    p.source_restore_point = jp.value("sourceRestorePoint", std::string());
    p.provisioning_state = "Succeeded";
    for (const auto& jd : jp.at("diskRestorePoints")) {
      DiskRestorePointRecord d;
      d.disk = jd.at("disk").get<std::string>();
      d.size_bytes = jd.at("sizeBytes").get<uint64_t>();
      d.granularity = jd.at("granularity").get<uint32_t>();
      d.full = jd.value("full", false);
      d.store_point = jd.at("storePoint").get<uint64_t>();
      d.parent_store_point = jd.value("parentStorePoint", uint64_t{0});
      d.blocks_to_copy = jd.value("blocksToCopy", uint64_t{0});
      d.blocks_copied = jd.value("blocksCopied", uint64_t{0});
      d.bytes_stored = jd.value("bytesStored", uint64_t{0});
      d.status = "Succeeded";
      d.completion_percent = 100;
      p.disk_restore_points.push_back(std::move(d));
    }
    return std::make_pair(std::move(c), std::move(p));
  } catch (const nlohmann::json::exception& e) {
    return Status::InvalidArgument(std::string("manifest: ") + e.what());
  }
}

}  // namespace rpoint
