#include "store/file_util.h"

#include <dirent.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <memory>

namespace rpoint::store {

Status RemoveFileDurable(const std::string& dir, const std::string& name) {
  std::string path = dir + "/" + name;
  if (::unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Status::FromErrno(errno, "unlink " + path);
  }
  return FsyncDir(dir);
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
