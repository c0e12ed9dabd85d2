// Disk files: the filesystem steps behind creating and deleting a disk, each
// made durable in the order crash recovery relies on (file and its directory
// entry on disk before the metadata row that names them commits).
//
// Thread-safety: plain functions on paths; callers serialise per path.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "common/file_io.h"  // FsyncDir, MakeDirs
#include "common/status.h"

namespace rpoint {

// Creates `path` exclusively (AlreadyExists if anything is there) as a sparse
// file of `size_bytes`, mode 0600, and fsyncs the file and its directory. On
// any failure nothing is left behind.
Status CreateSparseFile(const std::string& path, uint64_t size_bytes);

// Removes `path` (a missing file is fine) and fsyncs its directory.
Status RemoveFile(const std::string& path);

// Renames `from` to `to` (replacing nothing: AlreadyExists if `to` exists)
// and fsyncs their directory, so the new name survives a crash.
Status RenameFile(const std::string& from, const std::string& to);

// The marker beside the file of a disk a restore is filling: `path`.filling.
// It exists from before the disk file is created until after the fill is
// durable and before the disk is Succeeded (served), so the file system alone
// tells a partly filled disk from a whole one (a lost metadata.db loses the
// provisioning state).
std::string FillingMarker(const std::string& disk_path);
// Creates the marker durably (file and directory fsynced), holding `text`
// (what the restore fills the disk from, for the logs).
Status CreateFillingMarker(const std::string& disk_path, const std::string& text);
// The marker's text ("" when it cannot be read); whether it exists below.
std::string ReadFillingMarker(const std::string& disk_path);
bool HasFillingMarker(const std::string& disk_path);

// Whether the regular file at `path` holds any allocated data (SEEK_DATA). A
// file that never received a write is one hole: false. A filesystem without
// SEEK_DATA answers true (it cannot tell, and true is the safe answer for the
// callers, which only ever delete a file that holds nothing).
Result<bool> FileHasData(const std::string& path);

// Directory part of a path ("." when it has none).
std::string DirName(const std::string& path);

// Now, as RFC 3339 UTC with microseconds: 2026-11-01T12:34:56.123456Z.
std::string NowRfc3339();
// `t` in the same fixed-width form (so text order is time order).
std::string FormatRfc3339(std::chrono::system_clock::time_point t);

}  // namespace rpoint
