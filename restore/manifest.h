// Restore point manifests: what a region keeps of each Succeeded restore point
// so that the region alone (copied to another host, or beside a fresh
// metadata.db) can list and restore its points.
//
// One JSON document per point, stored through store::Store::put_manifest as
// <region>/manifests/<collection>~<point>.json ('~' is never in a resource
// name). Written after every disk point is committed in the store and before
// the metadata transaction that marks the point Succeeded; removed before a
// deleted point's store points go. Holds the collection (name, source VM name,
// creation time), the point (name, time, consistency mode, excluded disks,
// source metadata with the VM configuration, cut pause, and for a copy the id
// of the point it was copied from) and per disk restore
// point its disk name, size, granularity, full flag, store point id and bytes
// stored.
//
// Thread-safety: stateless functions.
#pragma once

#include <string>
#include <utility>

#include "common/status.h"
#include "restore/restore_service.h"

namespace rpoint {

std::string ManifestName(const std::string& collection, const std::string& point);
std::string EncodeManifest(const CollectionRecord& c, const RestorePointRecord& p);
// InvalidArgument naming what is missing or malformed. The point comes back
// Succeeded, with no operation id; the collection's region is left empty.
Result<std::pair<CollectionRecord, RestorePointRecord>> DecodeManifest(const std::string& text);

}  // namespace rpoint
