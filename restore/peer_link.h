// Regions on other hosts: what one rpointd host sends another, and the two
// seams the restore service uses for it.
//
// A peer region (regions[].peer in the config) has no store here: its
// collections and points live in a region of the peer (regions[].peer_region),
// with their manifests, so the peer restores them alone. The local host keeps
// a record of each far collection and point so its own API lists them and
// shows a copy's progress. docs/api.md, "Peer API", has the wire format.
//
// A copy to a peer region: the local host shares each source disk restore
// point as a short-lived NBD-over-TLS export (an access grant, PointSharer)
// and asks the peer (PeerLink, HTTPS with mutual TLS) to receive the point
// with its chunk digest list; the peer reads only the chunks its store lacks
// (content addressed) with libnbd, re-hashes each, writes and commits the
// point, and answers progress polls.
//
// Incremental (a base): when the peer already holds a copy of an earlier
// point of the same disk (the sender's newest Succeeded record in the far
// collection whose source point it still has), the pull names that base and
// lists only the slots whose digest differs from it (PeerPullDisk::changed).
// The peer starts its tree from its copy of the base, asks the grant export
// for the NBD meta context rpoint:changed:{base collection}/{base point} and
// checks that its dirty extents are exactly the listed slots, then looks up
// and reads only those: the message, the lookups and the data are all
// proportional to the change. A peer without the base answers NotFound and
// the sender posts the full list instead.
//
// Thread-safety: PeerPull, PeerPointState and PeerAbort are plain values; PeerLink and
// PointSharer implementations are safe from any thread.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "store/digest.h"

namespace rpoint {

// One disk of a point to receive.
struct PeerPullDisk {
  std::string disk;
  uint64_t size_bytes = 0;
  uint32_t granularity = 0;
  uint32_t chunk_size = 0;
  std::string uri;  // nbds://host:port/TOKEN serving the source disk point read-only
  // Full: every data slot, holes absent. Changed (the pull has a base): only
  // the slots that differ from the base's copy of this disk, a zero digest
  // for one that became a hole.
  std::vector<std::pair<uint64_t, store::Digest>> chunks;
  bool changed = false;
};

// A point to receive: the cut it describes and its disks.
struct PeerPull {
  std::string source_vm;
  std::string source_restore_point;  // the id on the sending host
  std::string consistency_mode;
  std::string time_created;
  std::vector<std::string> exclude_disks;
  nlohmann::json source_metadata;
  // The base (empty: none): the peer's point of the same collection, and the
  // sending host's point it is a copy of ("/restorePointCollections/c/
  // restorePoints/rp"), whose rpoint:changed context the grants offer, and
  // its timeCreated: a point deleted and made again under the same name is
  // another point, never a base.
  std::string base_restore_point, base_source_restore_point, base_time_created;
  std::vector<PeerPullDisk> disks;
};

// A received point as the peer reports it to the sender's polls.
struct PeerPointState {
  std::string provisioning_state;  // Creating | Succeeded | Failed | Deleting
  std::string error_code, error_message;
  struct Disk {
    std::string disk;
    uint64_t to_copy = 0, copied = 0, bytes_moved = 0;
  };
  std::vector<Disk> disks;
  uint64_t chunks_looked_up = 0;  // digests the peer looked up in its store (once done)
};

// The sending host ends a copy it posted (POST .../restorePoints/{rp}/abort):
// the peer stops reading, discards what it received (its store points go, the
// rest is garbage for the next GC) and ends the point Failed with this error,
// or deletes it when `delete_point` (the copy was canceled by deleting its
// point on the sender).
struct PeerAbort {
  std::string source_restore_point;  // must be the point's source: another copy is left alone
  std::string code, message;
  bool delete_point = false;
};

nlohmann::json EncodePeerPull(const PeerPull& p);
Result<PeerPull> DecodePeerPull(const nlohmann::json& j);
nlohmann::json EncodePeerPointState(const PeerPointState& s);
Result<PeerPointState> DecodePeerPointState(const nlohmann::json& j);
nlohmann::json EncodePeerAbort(const PeerAbort& a);
Result<PeerAbort> DecodePeerAbort(const nlohmann::json& j);

// An HTTPS client for other hosts' peer API.
class PeerLink {
 public:
  virtual ~PeerLink() = default;
  // One request to `peer` ("host:port"); 2xx: the JSON body (null when empty).
  // A transport failure (connect, TLS, timeout) is IoError, an error answer
  // the Status its {"error"} names (Unavailable for 5xx).
  virtual Result<nlohmann::json> call(const std::string& peer, const std::string& method,
                                      const std::string& path, const nlohmann::json& body) = 0;
};

// Short-lived read-only NBD exports of this host's disk restore points.
class PointSharer {
 public:
  virtual ~PointSharer() = default;
  virtual Result<std::string> share(const std::string& collection, const std::string& point,
                                    const std::string& disk, uint64_t seconds) = 0;
  virtual void unshare(const std::string& collection, const std::string& point,
                       const std::string& disk) = 0;
};

}  // namespace rpoint
