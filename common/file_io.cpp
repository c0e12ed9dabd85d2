#include "common/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <type_traits>

#include "common/fault_injection.h"
#include "common/thread_role.h"
#include "common/unique_fd.h"

namespace rpoint {

namespace {

// O_DIRECT wants buffer, offset and length aligned to the logical block size;
// 4 KiB covers every block device in use.
constexpr size_t kDirectAlign = 4096;

bool Aligned(const void* p, uint64_t off) {
  return reinterpret_cast<uintptr_t>(p) % kDirectAlign == 0 && off % kDirectAlign == 0;
}

// The one transfer loop, for reads and writes: continues short transfers,
// retries EINTR, applies the fault point. With `direct` (an O_DIRECT
// descriptor) it stops early, without an error, where the rest must go
// through the page cache: the transfer was refused as direct I/O (EINVAL), or
// a short one left the rest unaligned. A read stops at the end of the file
// (*eof). *done: bytes transferred. Byte: char reads into p, const char
// writes from it.
template <typename Byte>
Status Transfer(int fd, Byte* p, size_t len, uint64_t off, const std::string& what,
                const char* fault_point, bool direct, size_t* done, bool* eof) {
  constexpr bool kRead = !std::is_const_v<Byte>;
  *done = 0;
  *eof = false;
  const char* verb = kRead ? "read " : "write ";
  while (*done < len) {
    const auto at = static_cast<off_t>(off + *done);
    ssize_t n;
    if constexpr (kRead) {
      n = fault::Pread(fault_point, fd, p + *done, len - *done, at);
    } else {
      n = fault::Pwrite(fault_point, fd, p + *done, len - *done, at);
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (direct && errno == EINVAL) return Status::Ok();
      return Status::FromErrno(errno, verb + what);
    }
    if (n == 0) {
      // A regular file never takes 0 bytes of a non-empty write without an error.
      if (!kRead) return Status::IoError("write " + what + ": no progress");
      *eof = true;
      return Status::Ok();
    }
    *done += size_t(n);
    if (direct && *done % kDirectAlign != 0) return Status::Ok();
  }
  return Status::Ok();
}

Status EndOfFile(const std::string& what) {
  return Status::IoError("read " + what + ": unexpected end of file");
}

}  // namespace

Result<UniqueFd> OpenFile(const std::string& path, int flags, unsigned mode,
                          const char* fault_point, const std::string& what) {
  UniqueFd fd(fault::Open(fault_point, path.c_str(), flags, static_cast<mode_t>(mode)));
  if (!fd) {
    return Status::FromErrno(
        errno, ((flags & O_CREAT) ? "create " : "open ") + (what.empty() ? path : what));
  }
  return fd;
}

Status PreadFull(int fd, void* buf, size_t len, uint64_t off, const std::string& what,
                 const char* fault_point) {
  RPOINT_ASSERT_MAY_BLOCK("pread");
  size_t done = 0;
  bool eof = false;
  Status s = Transfer(fd, static_cast<char*>(buf), len, off, what, fault_point, false, &done, &eof);
  if (s.ok() && eof) return EndOfFile(what);
  return s;
}

Status PreadDirect(int direct_fd, int fd, void* buf, size_t len, uint64_t off,
                   const std::string& what, const char* fault_point, size_t cap) {
  RPOINT_ASSERT_MAY_BLOCK("pread");
  auto* p = static_cast<char*>(buf);
  const size_t rounded = (len + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  size_t done = 0;
  if (direct_fd >= 0 && Aligned(p, off) && (rounded == len || rounded <= cap)) {
    bool eof = false;
    Status s = Transfer(direct_fd, p, rounded, off, what, fault_point, true, &done, &eof);
    if (!s.ok()) return s;
    if (done >= len) return Status::Ok();  // what came past len is the caller's slack
    if (eof) return EndOfFile(what);
  }
  return PreadFull(fd, p + done, len - done, off + done, what, fault_point);
}

Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, const std::string& what,
                  const char* fault_point) {
  size_t done = 0;
  bool eof = false;
  return Transfer(fd, static_cast<const char*>(buf), len, off, what, fault_point, false, &done,
                  &eof);
}

Status PwriteDirect(int direct_fd, int fd, const void* buf, size_t len, uint64_t off,
                    const std::string& what, const char* fault_point, size_t* direct_bytes) {
  const auto* p = static_cast<const char*>(buf);
  size_t done = 0;
  if (direct_fd >= 0 && Aligned(p, off) && len % kDirectAlign == 0) {
    bool eof = false;
    Status s = Transfer(direct_fd, p, len, off, what, fault_point, true, &done, &eof);
    if (!s.ok()) return s;
  }
  if (direct_bytes != nullptr) *direct_bytes = done;
  if (done == len) return Status::Ok();
  return PwriteFull(fd, p + done, len - done, off + done, what, fault_point);
}

Result<uint64_t> SeekData(int fd, uint64_t pos, const std::string& what) {
  RPOINT_ASSERT_MAY_BLOCK("lseek");
  off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
  if (data >= 0) return static_cast<uint64_t>(data);
  if (errno == ENXIO) return kNoData;
  if (errno == EINVAL || errno == EOPNOTSUPP) return pos;
  return Status::FromErrno(errno, "lseek SEEK_DATA " + what);
}

Result<std::string> ReadWholeFile(int fd, const std::string& what, const char* fault_point) {
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t n = fault::Pread(fault_point, fd, buf, sizeof(buf), static_cast<off_t>(out.size()));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + what);
    }
    if (n == 0) break;
    out.append(buf, size_t(n));
  }
  return out;
}

Result<std::string> ReadWholeFile(const std::string& path, const char* fault_point) {
  auto fd = OpenFile(path, O_RDONLY | O_CLOEXEC);
  if (!fd.ok()) return fd.status();
  return ReadWholeFile(fd->get(), path, fault_point);
}

Status WriteFileAtomic(const std::string& dir, const std::string& name, const std::string& data,
                       unsigned mode, int dir_fd, const char* fault_point) {
  const std::string path = dir + "/" + name, tmp = path + ".tmp";
  {
    auto fd = OpenFile(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (!fd.ok()) return fd.status();
    Status s = PwriteFull(fd->get(), data.data(), data.size(), 0, tmp, fault_point);
    if (s.ok() && fault::Fdatasync(fault_point, fd->get()) != 0) {
      s = Status::FromErrno(errno, "fdatasync " + tmp);
    }
    if (!s.ok()) {
      ::unlink(tmp.c_str());
      return s;
    }
  }
  if (fault::Rename(fault_point, tmp.c_str(), path.c_str()) != 0) {
    Status s = Status::FromErrno(errno, "rename " + tmp);
    ::unlink(tmp.c_str());
    return s;
  }
  return dir_fd >= 0 ? FsyncDir(dir_fd, dir, fault_point) : FsyncDir(dir, fault_point);
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
