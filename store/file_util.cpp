#include "store/file_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <memory>

#include "common/fault_injection.h"
#include "common/thread_role.h"
#include "common/unique_fd.h"

namespace rpoint::store {

Status WriteFileAtomic(const std::string& dir, const std::string& name, const std::string& data) {
  std::string path = dir + "/" + name, tmp = path + ".tmp";
  {
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640));
    if (!fd) return Status::FromErrno(errno, "create " + tmp);
    Status s = PwriteFull(fd.get(), data.data(), data.size(), 0, tmp);
    if (s.ok() && ::fsync(fd.get()) != 0) s = Status::FromErrno(errno, "fsync " + tmp);
    if (!s.ok()) {
      ::unlink(tmp.c_str());
      return s;
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Status s = Status::FromErrno(errno, "rename " + tmp);
    ::unlink(tmp.c_str());
    return s;
  }
  return FsyncDir(dir);
}

Status RemoveFileDurable(const std::string& dir, const std::string& name) {
  std::string path = dir + "/" + name;
  if (::unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Status::FromErrno(errno, "unlink " + path);
  }
  return FsyncDir(dir);
}

Result<std::string> ReadWholeFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return Status::FromErrno(errno, "open " + path);
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + path);
    }
    if (n == 0) break;
    out.append(buf, size_t(n));
  }
  return out;
}

Result<std::vector<std::string>> ListDir(const std::string& dir) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), ::closedir);
  if (!d) return Status::FromErrno(errno, "opendir " + dir);
  std::vector<std::string> out;
  while (dirent* e = ::readdir(d.get())) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(std::move(n));
  }
  return out;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string PackSubdir(const std::string& packs_dir, uint64_t id) {
  char sub[8];
  std::snprintf(sub, sizeof(sub), "%02x", unsigned(id & 0xff));
  return packs_dir + "/" + sub;
}

std::string PackPath(const std::string& packs_dir, uint64_t id) {
  char name[32];
  std::snprintf(name, sizeof(name), "%016llx.pack", static_cast<unsigned long long>(id));
  return PackSubdir(packs_dir, id) + "/" + name;
}

std::optional<uint64_t> ParsePackName(const std::string& name) {
  if (name.size() != 21 || name.compare(16, 5, ".pack") != 0) return std::nullopt;
  uint64_t v = 0;
  for (size_t i = 0; i < 16; ++i) {
    char c = name[i];
    int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
    if (d < 0) return std::nullopt;
    v = (v << 4) | uint64_t(d);
  }
  return v;
}

}  // namespace rpoint::store
