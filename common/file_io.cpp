#include "common/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "common/fault_injection.h"
#include "common/thread_role.h"
#include "common/unique_fd.h"

namespace rpoint {

Status PreadFull(int fd, void* buf, size_t len, uint64_t off, const std::string& what) {
  RPOINT_ASSERT_MAY_BLOCK("pread");
  auto* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + what);
    }
    if (n == 0) return Status::IoError("read " + what + ": unexpected end of file");
    p += n;
    len -= size_t(n);
    off += uint64_t(n);
  }
  return Status::Ok();
}

namespace {

// O_DIRECT wants buffer, offset and length aligned to the logical block size;
// 4 KiB covers every block device in use.
constexpr size_t kDirectAlign = 4096;

// The one write loop: continues short writes, retries EINTR. With `direct`
// (an O_DIRECT descriptor) it stops early, without an error, where the rest
// must go through the page cache: the write was refused as direct I/O
// (EINVAL), or a short write left the rest unaligned. *done: bytes written.
Status WriteLoop(int fd, const char* p, size_t len, uint64_t off, const std::string& what,
                 const char* fault_point, bool direct, size_t* done) {
  *done = 0;
  while (*done < len) {
    ssize_t n =
        fault::Pwrite(fault_point, fd, p + *done, len - *done, static_cast<off_t>(off + *done));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (direct && errno == EINVAL) return Status::Ok();
      return Status::FromErrno(errno, "write " + what);
    }
    // A regular file never takes 0 bytes of a non-empty write without an error.
    if (n == 0) return Status::IoError("write " + what + ": no progress");
    *done += size_t(n);
    if (direct && *done % kDirectAlign != 0) return Status::Ok();
  }
  return Status::Ok();
}

}  // namespace

Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, const std::string& what,
                  const char* fault_point) {
  size_t done = 0;
  return WriteLoop(fd, static_cast<const char*>(buf), len, off, what, fault_point, false, &done);
}

Status PwriteDirect(int direct_fd, int fd, const void* buf, size_t len, uint64_t off,
                    const std::string& what, const char* fault_point, size_t* direct_bytes) {
  const auto* p = static_cast<const char*>(buf);
  size_t done = 0;
  if (direct_fd >= 0 && reinterpret_cast<uintptr_t>(p) % kDirectAlign == 0 &&
      len % kDirectAlign == 0 && off % kDirectAlign == 0) {
    Status s = WriteLoop(direct_fd, p, len, off, what, fault_point, true, &done);
    if (!s.ok()) return s;
  }
  if (direct_bytes != nullptr) *direct_bytes = done;
  if (done == len) return Status::Ok();
  return PwriteFull(fd, p + done, len - done, off + done, what, fault_point);
}

Status FsyncDir(int dir_fd, const std::string& dir, const char* fault_point) {
  if (fault::Fsync(fault_point, dir_fd) != 0) return Status::FromErrno(errno, "fsync dir " + dir);
  return Status::Ok();
}

Status FsyncDir(const std::string& dir, const char* fault_point) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return Status::FromErrno(errno, "open dir " + dir);
  return FsyncDir(fd.get(), dir, fault_point);
}

Status MakeDirs(const std::string& path, unsigned mode, bool* created) {
  if (created != nullptr) *created = false;
  if (path.empty()) return Status::InvalidArgument("empty directory path");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return Status::AlreadyExists(path + " exists and is not a directory");
    return Status::Ok();
  }
  if (errno != ENOENT) return Status::FromErrno(errno, "stat " + path);
  size_t slash = path.find_last_of('/');
  if (slash != std::string::npos && slash > 0) {
    if (Status s = MakeDirs(path.substr(0, slash), mode); !s.ok()) return s;
  }
  if (::mkdir(path.c_str(), mode) != 0) {
    // Lost a race with another creator: fine if what is there is a directory.
    if (errno == EEXIST && ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      return Status::Ok();
    }
    return Status::FromErrno(errno, "mkdir " + path);
  }
  // mkdir's mode is filtered by the umask; the requested mode is what we want.
  if (::chmod(path.c_str(), mode) != 0) return Status::FromErrno(errno, "chmod " + path);
  if (created != nullptr) *created = true;
  return Status::Ok();
}

}  // namespace rpoint
