#include "daemon/state_dir.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace rpoint {

Status TightenDirectory(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, "cannot stat " + path);
  if ((st.st_mode & 077) == 0) return Status::Ok();
  mode_t mode = st.st_mode & 0700;
  if (chmod(path.c_str(), mode) != 0) return Status::FromErrno(errno, "cannot chmod " + path);
  spdlog::warn("state directory {} was mode {:04o}, readable by others: now {:04o}", path,
               static_cast<unsigned>(st.st_mode & 07777), static_cast<unsigned>(mode));
  return Status::Ok();
}

Result<StateLock> StateLock::Acquire(const std::string& state_dir) {
  std::string path = state_dir + "/rpointd.lock";
  UniqueFd fd(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd) return Status::FromErrno(errno, "cannot open lock file " + path);
  if (flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    if (e != EWOULDBLOCK) return Status::FromErrno(e, "cannot lock " + path);
    char buf[32] = {};
    ssize_t n = pread(fd.get(), buf, sizeof buf - 1, 0);
    std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "?";
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    return Status::Conflict("another rpointd (pid " + pid + ") is running with state directory " +
                            state_dir);
  }
  std::string pid = std::to_string(getpid()) + "\n";
  if (ftruncate(fd.get(), 0) != 0 || pwrite(fd.get(), pid.data(), pid.size(), 0) < 0) {
    return Status::FromErrno(errno, "cannot write " + path);
  }
  return StateLock(std::move(fd), std::move(path));
}

}  // namespace rpoint
