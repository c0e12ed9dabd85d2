// CutDisks: a crash-consistent cut across all the disks of a VM.
//
// "Acknowledged before the cut is in, submitted after is out." All gates close
// (new mutations park), every disk's tracker flips and gets its snapshot, all
// gates open. No drain: writes already in flight may land on either side, as
// with a power cut. Because every disk flips inside the one pause, a write that
// depends on another disk's acknowledged write can never be in the point
// without it. Staging files (and the trackers' next generations) are made before the pause, so the
// pause holds no I/O and lasts microseconds whatever the disk sizes.
//
// Thread-safety: call from one control-plane thread per VM at a time.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/disk_snapshot.h"
#include "engine/file_disk.h"

namespace rpoint {

struct CutResult {
  std::vector<std::shared_ptr<DiskSnapshot>> snapshots;  // in the order of the disks
  std::chrono::nanoseconds pause{0};
};

// staging_dir: where the copy-before-write staging files go (local, fast);
// they are unnamed (O_TMPFILE). tag: names the point in error messages.
// force_full: empty, or one flag per disk (see FileDisk::freeze).
// also_copy: empty, or one bitmap (or nullptr) per disk: blocks an
// incremental point copies as if changed (FileDisk::freeze).
// since: empty, or per disk the tracker generation the point's base captured
// through (FileDisk::freeze); an incremental point copies what changed after it.
Result<CutResult> CutDisks(const std::vector<std::shared_ptr<FileDisk>>& disks,
                           const std::string& staging_dir, const std::string& tag,
                           const std::vector<bool>& force_full = {},
                           const std::vector<std::shared_ptr<const SparseBitmap>>& also_copy = {},
                           const std::vector<uint64_t>& since = {});

}  // namespace rpoint
