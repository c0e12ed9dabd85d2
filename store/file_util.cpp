#include "store/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "common/fault_injection.h"
#include "common/unique_fd.h"

namespace rpoint::store {

Status FsyncDir(const std::string& dir, const char* fault_point) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return Status::FromErrno(errno, "open dir " + dir);
  if (fault::Fsync(fault_point, fd.get()) != 0) return Status::FromErrno(errno, "fsync dir " + dir);
  return Status::Ok();
}

Status MakeDir(const std::string& dir, bool* created) {
  if (created) *created = false;
  if (::mkdir(dir.c_str(), 0750) == 0) {
    if (created) *created = true;
    return Status::Ok();
  }
  if (errno == EEXIST) return Status::Ok();
  return Status::FromErrno(errno, "mkdir " + dir);
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
