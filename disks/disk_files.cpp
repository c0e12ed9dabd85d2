#include "disks/disk_files.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>

#include "common/file_io.h"
#include "common/unique_fd.h"

namespace rpoint {

std::string DirName(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

Status CreateSparseFile(const std::string& path, uint64_t size_bytes) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd) {
    if (errno == EEXIST) {
      return Status::AlreadyExists(path + " already exists (a file not managed by rpointd)");
    }
    return Status::FromErrno(errno, "create " + path);
  }
  Status s;
  if (ftruncate(fd.get(), static_cast<off_t>(size_bytes)) != 0) {
    s = Status::FromErrno(errno, "ftruncate " + path);
  } else if (fsync(fd.get()) != 0) {
    s = Status::FromErrno(errno, "fsync " + path);
  } else {
    s = FsyncDir(DirName(path));
  }
  if (!s.ok()) {
    fd.reset();
    ::unlink(path.c_str());
    (void)FsyncDir(DirName(path));
  }
  return s;
}

Status RemoveFile(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "unlink " + path);
  }
  return FsyncDir(DirName(path));
}

Status RenameFile(const std::string& from, const std::string& to) {
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) {
    if (errno == EEXIST) return Status::AlreadyExists(to + " already exists");
    return Status::FromErrno(errno, "rename " + from + " to " + to);
  }
  return FsyncDir(DirName(to));
}

std::string FillingMarker(const std::string& disk_path) {
  return disk_path + ".filling";
}

Status CreateFillingMarker(const std::string& disk_path, const std::string& text) {
  const std::string path = FillingMarker(disk_path);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return Status::FromErrno(errno, "create " + path);
  Status s = PwriteFull(fd.get(), text.data(), text.size(), 0, path);
  if (s.ok() && ::fsync(fd.get()) != 0) s = Status::FromErrno(errno, "fsync " + path);
  if (s.ok()) s = FsyncDir(DirName(path));
  if (!s.ok()) {
    fd.reset();
    (void)RemoveFile(path);
  }
  return s;
}

std::string ReadFillingMarker(const std::string& disk_path) {
  UniqueFd fd(::open(FillingMarker(disk_path).c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return "";
  char text[512];
  ssize_t n = ::pread(fd.get(), text, sizeof text, 0);
  return n > 0 ? std::string(text, static_cast<size_t>(n)) : "";
}

bool HasFillingMarker(const std::string& disk_path) {
  struct stat st {};
  return ::lstat(FillingMarker(disk_path).c_str(), &st) == 0;
}

Result<bool> FileHasData(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return Status::FromErrno(errno, "open " + path);
  auto data = SeekData(fd.get(), 0, path);
  if (!data.ok()) return data.status();
  return data.value() != kNoData;
}

std::string NowRfc3339() {
  return FormatRfc3339(std::chrono::system_clock::now());
}

std::string FormatRfc3339(std::chrono::system_clock::time_point now) {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<long long>(us % 1000000));
  return buf;
}

}  // namespace rpoint
