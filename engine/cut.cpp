#include "engine/cut.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace rpoint {

Result<CutResult> CutDisks(const std::vector<std::shared_ptr<FileDisk>>& disks,
                           const std::string& staging_dir, const std::string& tag,
                           const std::vector<bool>& force_full,
                           const std::vector<std::shared_ptr<const SparseBitmap>>& also_copy) {
  if (!force_full.empty() && force_full.size() != disks.size()) {
    return Status::InvalidArgument("CutDisks: force_full needs one flag per disk");
  }
  if (!also_copy.empty() && also_copy.size() != disks.size()) {
    return Status::InvalidArgument("CutDisks: also_copy needs one entry per disk");
  }
  // Before the pause: everything that may touch the filesystem.
  std::vector<std::pair<UniqueFd, std::string>> staging;
  for (const auto& d : disks) {
    if (!d->tracker()) return Status::Unsupported("disk " + d->name() + " is not change-tracked");
    if (d->snapshot()) {
      return Status::Conflict("disk " + d->name() + " already has a restore point in progress");
    }
    std::string path = staging_dir + "/" + d->name() + "." + tag + ".staging";
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!fd) return Status::FromErrno(errno, "create " + path);
    staging.emplace_back(std::move(fd), path);
  }

  CutResult out;
  auto t0 = std::chrono::steady_clock::now();
  for (const auto& d : disks) d->close_gate();
  Status failure;
  for (size_t i = 0; i < disks.size() && failure.ok(); ++i) {
    bool full = !force_full.empty() && force_full[i];
    auto snap = disks[i]->freeze(std::move(staging[i].first), staging[i].second, full,
                                 also_copy.empty() ? nullptr : also_copy[i]);
    if (!snap.ok()) {
      failure = snap.status();
    } else {
      out.snapshots.push_back(std::move(snap).value());
    }
  }
  for (const auto& d : disks) d->open_gate();
  out.pause = std::chrono::steady_clock::now() - t0;
  // After the pause: the generation files the next cut will flip to.
  for (const auto& d : disks) {
    Status st = d->tracker()->prepare_next();
    if (!st.ok() && failure.ok()) failure = st;
  }

  if (!failure.ok()) {
    // The disks that did flip keep their frozen generation (never retired), so
    // the next point still covers their changes.
    for (size_t i = 0; i < out.snapshots.size(); ++i) disks[i]->end_snapshot();
    for (auto& [fd, path] : staging) unlink(path.c_str());
    return failure;
  }
  return out;
}

}  // namespace rpoint
