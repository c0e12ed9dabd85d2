// Small POSIX helpers the store's files share: whole-buffer pread/pwrite,
// directory fsync, atomic small-file replacement, and the layout of pack
// paths inside a region directory.
// Thread-safety: stateless functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

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
