#include "engine/cut.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "common/fault_injection.h"

namespace rpoint {
namespace {

// An unnamed staging file in staging_dir (O_TMPFILE): no name can collide with
// another point's (disk, collection and point names may contain dots), no job
// can truncate a file another job holds, and a crash leaves nothing behind.
// Filesystems without O_TMPFILE get a unique mkostemps() name that is unlinked
// at once (a crash in between leaves a *.staging file that Open sweeps).
Result<UniqueFd> OpenStagingFile(const std::string& staging_dir, const std::string& what) {
  UniqueFd fd(::open(staging_dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  if (fd) return fd;
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
    return Status::FromErrno(errno, "create a staging file in " + staging_dir + " for " + what);
  }
  std::string path = staging_dir + "/.cbw-XXXXXX.staging";
  fd.reset(mkostemps(path.data(), 8, O_CLOEXEC));
  if (!fd)
    return Status::FromErrno(errno, "create a staging file in " + staging_dir + " for " + what);
  if (unlink(path.c_str()) != 0) return Status::FromErrno(errno, "unlink " + path);
  return fd;
}

}  // namespace

Result<CutResult> CutDisks(const std::vector<std::shared_ptr<FileDisk>>& disks,
                           const std::string& staging_dir, const std::string& tag,
                           const std::vector<bool>& force_full,
                           const std::vector<std::shared_ptr<const SparseBitmap>>& also_copy,
                           const std::vector<uint64_t>& since) {
  if (!force_full.empty() && force_full.size() != disks.size()) {
    return Status::InvalidArgument("CutDisks: force_full needs one flag per disk");
  }
  if (!also_copy.empty() && also_copy.size() != disks.size()) {
    return Status::InvalidArgument("CutDisks: also_copy needs one entry per disk");
  }
  if (!since.empty() && since.size() != disks.size()) {
    return Status::InvalidArgument("CutDisks: since needs one entry per disk");
  }
  // First: everything that may touch the filesystem or fail.
  std::vector<UniqueFd> staging;
  for (const auto& d : disks) {
    if (!d->tracker()) return Status::Unsupported("disk " + d->name() + " is not change-tracked");
    if (d->snapshot()) {
      return Status::Conflict("disk " + d->name() + " already has a restore point in progress");
    }
    // The generation the flip activates, made and fully allocated now: a
    // failure here (a full state filesystem) fails the point, never a guest
    // write. Made here rather than after the previous cut, so between points
    // a disk has one fully allocated generation file, not two.
    Status st = d->tracker()->prepare_next();
    if (!st.ok()) return st;
    auto fd = OpenStagingFile(staging_dir, "disk " + d->name() + " of " + tag);
    if (!fd.ok()) return fd.status();
    staging.push_back(std::move(fd).value());
  }

  // Arm every disk on one switch, snapshot installed. Writes meanwhile stay in
  // the old epoch: a cutting thread preempted here delays the cut, not a write.
  CutResult out;
  auto sw = std::make_shared<CutSwitch>();
  for (size_t i = 0; i < disks.size(); ++i) {
    bool full = !force_full.empty() && force_full[i];
    auto snap =
        disks[i]->arm_cut(sw, std::move(staging[i]), full,
                          also_copy.empty() ? nullptr : also_copy[i], since.empty() ? 0 : since[i]);
    if (!snap.ok()) {
      // Nothing was published: the armed disks go back as they were.
      for (size_t j = 0; j < out.snapshots.size(); ++j) disks[j]->abort_cut();
      return snap.status();
    }
    out.snapshots.push_back(std::move(snap).value());
  }
  // The cut: one store moves every disk to the new epoch.
  auto t0 = std::chrono::steady_clock::now();
  sw->publish();
  for (const auto& d : disks) {
    // Tests: a cutting thread preempted here (delay<MS>) must hold no write.
    fault::Hit("cut.settle");
    d->settle_cut();
  }
  out.pause = std::chrono::steady_clock::now() - t0;
  // Only now wake the flushers to write the frozen generations behind: woken
  // inside the window, on 2 vCPUs, one took the CPU from this thread before
  // the next disk was settled (bench/RESULTS.md, cutpause).
  for (const auto& d : disks) d->tracker()->write_behind();
  return out;
}

}  // namespace rpoint
