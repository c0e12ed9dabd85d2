// Point files and index reconciliation: what makes a region recoverable from
// its own files when store.db is lost, replaced by an empty one, or copied
// to another host without it.
//
// Every committed point also has a small text file <region>/points/<id>.point
// (written atomically before the commit transaction, removed before the
// record on delete), and every pack describes its objects in its trailer. So
// Store::Open can always bring the index back in line with the files:
//   * a sealed pack the index does not list is re-indexed from its trailer
//     (never deleted: it may hold the only copy of some point's data);
//   * a point file the index does not list is imported, when every page and
//     chunk its tree names is indexed (else it is logged and left alone);
//   * a point record without a file gets its file (older regions, a crash
//     in the middle of a delete).
// Store::repair() runs the same pass on a live store.
//
// Thread-safety: the codec functions are stateless; reconciliation runs in
// Store (see store.h) with no writer active.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/status.h"
#include "store/catalog.h"

namespace rpoint::store {

// <region>/points and the file name of one point in it ("<16 hex>.point").
std::string PointsDir(const std::string& region);
std::string PointFileName(PointId id);
std::optional<PointId> ParsePointFileName(const std::string& name);

// The self-describing text form of a point record (all fields; the tag hex
// encoded so any bytes survive) and its parser (InvalidArgument on anything
// malformed, naming the field).
std::string EncodePointFile(const PointRecord& r);
Result<PointRecord> DecodePointFile(const std::string& text);

}  // namespace rpoint::store
