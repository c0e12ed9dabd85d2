// Small POSIX helpers the store's files share: atomic small-file replacement, and the layout of
// pack paths inside a region directory. Thread-safety: stateless functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/file_io.h"
#include "common/status.h"

namespace rpoint::store {

// Whole-buffer reads and writes, directory fsync, mkdir (common/file_io.h,
// shared with every component).
using rpoint::FsyncDir;
using rpoint::MakeDirs;
using rpoint::PreadFull;
using rpoint::PwriteFull;
// Mode of the directories a region is made of.
constexpr unsigned kRegionDirMode = 0700;  // region data is the daemon's alone (issue #8)
// Makes `dir/name` hold exactly `data`, atomically and durably: written to
// `name.tmp`, fsynced, renamed over `name`, directory fsynced. A crash leaves
// either the old file (plus perhaps a stray .tmp) or the new one, never a mix.
Status WriteFileAtomic(const std::string& dir, const std::string& name, const std::string& data);
// Unlinks `dir/name` and fsyncs `dir`; a missing file is not an error.
Status RemoveFileDurable(const std::string& dir, const std::string& name);
// The whole content of a (small) file.
Result<std::string> ReadWholeFile(const std::string& path);
// Entry names of a directory (without . and ..).
Result<std::vector<std::string>> ListDir(const std::string& dir);
bool EndsWith(const std::string& s, const std::string& suffix);

// <region>/packs/<last byte of id, 2 hex>/<id, 16 hex>.pack
std::string PackSubdir(const std::string& packs_dir, uint64_t id);
std::string PackPath(const std::string& packs_dir, uint64_t id);
// The id in "<16 hex>.pack", or nothing for any other name.
std::optional<uint64_t> ParsePackName(const std::string& name);

}  // namespace rpoint::store
