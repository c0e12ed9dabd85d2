// The JSON of the peer API's bodies (restore/peer_link.h; docs/api.md, "Peer
// API"): one encoder and one decoder each, used by the sending host
// (restore/peer_jobs.cpp) and the receiving host's handlers (control/).
#include <cctype>

#include "restore/peer_link.h"

namespace rpoint {

using nlohmann::json;

namespace {

bool ParseHexDigest(const std::string& s, store::Digest* d) {
  if (s.size() != 2 * store::Digest::kSize) return false;
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < store::Digest::kSize; ++i) {
    int hi = nib(s[2 * i]), lo = nib(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    d->b[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

Status Bad(const std::string& what) {
  return Status::InvalidArgument("peer request: " + what);
}

}  // namespace

json EncodePeerPull(const PeerPull& p) {
  json disks = json::array();
  for (const auto& d : p.disks) {
    json chunks = json::array();
    for (const auto& [slot, digest] : d.chunks) {
      chunks.push_back(json::array({slot, digest.is_zero() ? json() : json(digest.hex())}));
    }
    // A changed list has its own key: a peer that predates bases refuses it
    // (400, no "chunks") instead of taking it for a whole disk.
    disks.push_back({{"disk", d.disk},
                     {"sizeBytes", d.size_bytes},
                     {"granularity", d.granularity},
                     {"chunkSize", d.chunk_size},
                     {"uri", d.uri},
                     {d.changed ? "changedChunks" : "chunks", std::move(chunks)}});
  }
  json j = {{"sourceVm", p.source_vm},
            {"sourceRestorePoint", p.source_restore_point},
            {"consistencyMode", p.consistency_mode},
            {"timeCreated", p.time_created},
            {"excludeDisks", p.exclude_disks},
            {"sourceMetadata", p.source_metadata},
            {"disks", std::move(disks)}};
  if (!p.base_restore_point.empty()) {
    j["base"] = {{"restorePoint", p.base_restore_point},
                 {"sourceRestorePoint", p.base_source_restore_point},
                 {"timeCreated", p.base_time_created}};
  }
  return j;
}

Result<PeerPull> DecodePeerPull(const json& j) {
  if (!j.is_object()) return Bad("expected a JSON object");
  PeerPull p;
  try {
    p.source_vm = j.at("sourceVm").get<std::string>();
    p.source_restore_point = j.at("sourceRestorePoint").get<std::string>();
    p.consistency_mode = j.at("consistencyMode").get<std::string>();
    p.time_created = j.at("timeCreated").get<std::string>();
    p.exclude_disks = j.at("excludeDisks").get<std::vector<std::string>>();
    p.source_metadata = j.at("sourceMetadata");
    if (j.contains("base")) {
      p.base_restore_point = j["base"].at("restorePoint").get<std::string>();
      p.base_source_restore_point = j["base"].at("sourceRestorePoint").get<std::string>();
      p.base_time_created = j["base"].at("timeCreated").get<std::string>();
      if (p.base_restore_point.empty() || p.base_source_restore_point.empty() ||
          p.base_time_created.empty()) {
        return Bad("an empty base");
      }
    }
    for (const auto& d : j.at("disks")) {
      PeerPullDisk pd;
      pd.disk = d.at("disk").get<std::string>();
      pd.size_bytes = d.at("sizeBytes").get<uint64_t>();
      pd.granularity = d.at("granularity").get<uint32_t>();
      pd.chunk_size = d.at("chunkSize").get<uint32_t>();
      pd.uri = d.at("uri").get<std::string>();
      if (pd.uri.rfind("nbds://", 0) != 0) {
        return Bad("disk '" + pd.disk + "': the uri must be nbds:// (NBD with TLS)");
      }
      if (pd.chunk_size == 0 || pd.size_bytes == 0) return Bad("disk '" + pd.disk + "': zero size");
      const uint64_t slots = (pd.size_bytes + pd.chunk_size - 1) / pd.chunk_size;
      pd.changed = d.contains("changedChunks");
      if (pd.changed == d.contains("chunks")) {
        return Bad("disk '" + pd.disk + "': give either chunks or changedChunks");
      }
      if (pd.changed && p.base_restore_point.empty()) {
        return Bad("disk '" + pd.disk + "': changedChunks needs a base");
      }
      uint64_t last = 0;
      for (const auto& c : d.at(pd.changed ? "changedChunks" : "chunks")) {
        if (!c.is_array() || c.size() != 2) return Bad("chunks are [slot, \"sha256 hex\"] pairs");
        uint64_t slot = c[0].get<uint64_t>();
        store::Digest dg;  // zero: a slot that became a hole (changed lists only)
        if (!(pd.changed && c[1].is_null()) &&
            (!ParseHexDigest(c[1].get<std::string>(), &dg) || dg.is_zero())) {
          return Bad("a chunk digest is not 64 hex digits");
        }
        if (slot >= slots || (!pd.chunks.empty() && slot <= last)) {
          return Bad("disk '" + pd.disk + "': chunk slots must ascend within the disk");
        }
        last = slot;
        pd.chunks.emplace_back(slot, dg);
      }
      p.disks.push_back(std::move(pd));
    }
  } catch (const json::exception& e) {
    return Bad(std::string("malformed: ") + e.what());
  }
  if (p.disks.empty()) return Bad("no disks");
  return p;
}

json EncodePeerPointState(const PeerPointState& s) {
  json disks = json::array();
  for (const auto& d : s.disks) {
    disks.push_back({{"disk", d.disk},
                     {"blocksToCopy", d.to_copy},
                     {"blocksCopied", d.copied},
                     {"bytesMoved", d.bytes_moved}});
  }
  json j = {{"provisioningState", s.provisioning_state},
            {"disks", std::move(disks)},
            {"chunksLookedUp", s.chunks_looked_up}};
  if (!s.error_code.empty()) j["error"] = {{"code", s.error_code}, {"message", s.error_message}};
  return j;
}

Result<PeerPointState> DecodePeerPointState(const json& j) {
  PeerPointState s;
  try {
    s.provisioning_state = j.at("provisioningState").get<std::string>();
    if (j.contains("error")) {
      s.error_code = j["error"].at("code").get<std::string>();
      s.error_message = j["error"].at("message").get<std::string>();
    }
    s.chunks_looked_up = j.value("chunksLookedUp", uint64_t{0});  // absent from older peers
    for (const auto& d : j.at("disks")) {
      s.disks.push_back({d.at("disk").get<std::string>(), d.at("blocksToCopy").get<uint64_t>(),
                         d.at("blocksCopied").get<uint64_t>(), d.at("bytesMoved").get<uint64_t>()});
    }
  } catch (const json::exception& e) {
    return Status::IoError(std::string("peer answered a malformed point state: ") + e.what());
  }
  return s;
}

json EncodePeerAbort(const PeerAbort& a) {
  return {{"sourceRestorePoint", a.source_restore_point},
          {"error", {{"code", a.code}, {"message", a.message}}},
          {"deletePoint", a.delete_point}};
}

Result<PeerAbort> DecodePeerAbort(const json& j) {
  PeerAbort a;
  try {
    a.source_restore_point = j.at("sourceRestorePoint").get<std::string>();
    a.code = j.at("error").at("code").get<std::string>();
    a.message = j.at("error").at("message").get<std::string>();
    a.delete_point = j.value("deletePoint", false);
  } catch (const json::exception& e) {
    return Status::InvalidArgument(std::string("peer request: abort malformed: ") + e.what());
  }
  if (a.code.empty()) return Status::InvalidArgument("peer request: abort without an error code");
  return a;
}

}  // namespace rpoint
