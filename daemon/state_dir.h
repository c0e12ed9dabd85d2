// State directory helpers: tightening its mode and the lock that keeps two
// daemons off one state directory (they would corrupt each other's metadata).
//
// Thread-safety: plain functions; StateLock is a move-only owner.
#pragma once

#include <string>

#include "common/file_io.h"
#include "common/status.h"
#include "common/unique_fd.h"

namespace rpoint {

// mkdir -p is common/file_io.h's MakeDirs.

// Clears the group and other bits of an existing directory (logging a warning
// when it had any): the state directory holds every disk's data.
Status TightenDirectory(const std::string& path);

// An exclusive flock(2) on <state_dir>/rpointd.lock, holding our pid, for the
// life of the process. Released by the kernel however the process ends, so a
// crash never leaves a lock that blocks the next start.
class StateLock {
 public:
  // Conflict (naming the holder's pid) when another process holds it.
  static Result<StateLock> Acquire(const std::string& state_dir);
  const std::string& path() const { return path_; }

 private:
  StateLock(UniqueFd fd, std::string path) : fd_(std::move(fd)), path_(std::move(path)) {}
  UniqueFd fd_;
  std::string path_;
};

}  // namespace rpoint
