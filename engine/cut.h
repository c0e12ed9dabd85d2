// CutDisks: a crash-consistent cut across all the disks of a VM.
//
// "Acknowledged before the cut is in, submitted after is out." No gate, no
// pause: the cut is one store. First every disk is prepared (staging file, the
// tracker's next generation) and armed on one CutSwitch with its snapshot
// installed, while writes go on in the old epoch; then the switch is published,
// which moves every disk of the VM to the new epoch at once (each mutation
// reads its epoch at submission: ChangeTracker::enter); then every tracker
// settles (waking no thread; the trackers' flushers are woken to write the
// frozen generations behind once the last disk settled). Any failure comes
// before the publish (and disarms); after it nothing can fail. No drain: writes
// in flight across the switch may land on either side, as with a power cut, and
// are tracked in the new generation before they are acknowledged. Because all
// disks switch with the one store, a write that depends on another disk's
// acknowledged write can never be in the point without it. The argument in
// full: docs/restore-points.md, *The cut*.
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
  // The publish window: from just before the switch's store to every disk
  // settled. No mutation waits in it (they take the switch path meanwhile);
  // it is reported as the point's cutPauseMicroseconds.
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
