// Small POSIX helpers the store's files share: whole-buffer pread/pwrite,
// directory fsync, and the layout of pack paths inside a region directory.
// Thread-safety: stateless functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "common/status.h"

namespace rpoint::store {

// Reads exactly len bytes at off; a short read (end of file) is an IoError.
Status PreadFull(int fd, void* buf, size_t len, uint64_t off, const std::string& what);
Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, const std::string& what);
// fsync of a directory, so entries created or renamed in it are durable.
Status FsyncDir(const std::string& dir);
// mkdir that accepts an existing directory; *created tells which happened.
Status MakeDir(const std::string& dir, bool* created);

// <region>/packs/<last byte of id, 2 hex>/<id, 16 hex>.pack
std::string PackSubdir(const std::string& packs_dir, uint64_t id);
std::string PackPath(const std::string& packs_dir, uint64_t id);
// The id in "<16 hex>.pack", or nothing for any other name.
std::optional<uint64_t> ParsePackName(const std::string& name);

}  // namespace rpoint::store
