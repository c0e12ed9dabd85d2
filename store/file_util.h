// Small POSIX helpers the store's files share: durable removal, directory listing, and the
// layout of pack paths inside a region directory. Thread-safety: stateless functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/file_io.h"
#include "common/status.h"

namespace rpoint::store {

// Opening files, whole-buffer reads and writes, whole small files read and
// replaced atomically, directory fsync, mkdir (common/file_io.h, shared with
// every component).
using rpoint::FsyncDir;
using rpoint::MakeDirs;
using rpoint::OpenFile;
using rpoint::PreadFull;
using rpoint::PwriteFull;
using rpoint::ReadWholeFile;
using rpoint::WriteFileAtomic;
// Mode of the directories a region is made of.
constexpr unsigned kRegionDirMode = 0700;  // region data is the daemon's alone (issue #8)
// Mode of the files in them (packs, point files, manifests, LOCK).
constexpr unsigned kRegionFileMode = 0640;
// Unlinks `dir/name` and fsyncs `dir`; a missing file is not an error.
Status RemoveFileDurable(const std::string& dir, const std::string& name);
// Entry names of a directory (without . and ..).
Result<std::vector<std::string>> ListDir(const std::string& dir);
bool EndsWith(const std::string& s, const std::string& suffix);

// <region>/packs/<last byte of id, 2 hex>/<id, 16 hex>.pack
std::string PackSubdir(const std::string& packs_dir, uint64_t id);
std::string PackPath(const std::string& packs_dir, uint64_t id);
// The id in "<16 hex>.pack", or nothing for any other name.
std::optional<uint64_t> ParsePackName(const std::string& name);

}  // namespace rpoint::store
