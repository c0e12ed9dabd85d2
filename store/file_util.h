// Small POSIX helpers the store's files share: whole-buffer pread/pwrite,
// directory fsync, and the layout of pack paths inside a region directory.
// Thread-safety: stateless functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "common/file_io.h"
#include "common/status.h"

namespace rpoint::store {

// Whole-buffer reads and writes (common/file_io.h, shared with the engine).
using rpoint::PreadFull;
using rpoint::PwriteFull;
// fsync of a directory, so entries created or renamed in it are durable.
// fault_point names it for fault injection (common/fault_injection.h).
Status FsyncDir(const std::string& dir, const char* fault_point = nullptr);
// mkdir that accepts an existing directory; *created tells which happened.
Status MakeDir(const std::string& dir, bool* created);

// <region>/packs/<last byte of id, 2 hex>/<id, 16 hex>.pack
std::string PackSubdir(const std::string& packs_dir, uint64_t id);
std::string PackPath(const std::string& packs_dir, uint64_t id);
// The id in "<16 hex>.pack", or nothing for any other name.
std::optional<uint64_t> ParsePackName(const std::string& name);

}  // namespace rpoint::store
