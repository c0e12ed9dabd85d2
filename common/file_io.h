// The file I/O every component shares: open, whole-buffer pread/pwrite (a
// short transfer is continued, EINTR retried), their O_DIRECT variants with a
// buffered fallback, the SEEK_DATA probe, whole small files read and replaced
// atomically, directory fsync and mkdir -p. Each open, read, write or sync
// may name a fault point (common/fault_injection.h); one transfer loop serves
// reads and writes, direct or buffered, so error messages, fault points and
// the direct-I/O fallback are alike everywhere.
// Thread-safety: stateless functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "common/unique_fd.h"

namespace rpoint {

// open(path, flags, mode). The error names `what` (default: the path), as
// "create <what>" when flags hold O_CREAT, else "open <what>".
Result<UniqueFd> OpenFile(const std::string& path, int flags, unsigned mode = 0,
                          const char* fault_point = nullptr, const std::string& what = "");

// Reads exactly len bytes at off; a short read (end of file) is an IoError.
Status PreadFull(int fd, void* buf, size_t len, uint64_t off, const std::string& what,
                 const char* fault_point = nullptr);
// Writes all len bytes at off, continuing short writes.
Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, const std::string& what,
                  const char* fault_point = nullptr);

// PwriteFull through `direct_fd` (the file opened with O_DIRECT, or -1) when
// buffer, offset and length are 4 KiB aligned: no copy into the page cache and
// no writeback later. What the filesystem refuses as direct I/O (EINVAL), or
// what a short direct write leaves unaligned, goes through `fd` (buffered).
// *direct_bytes (optional): how many leading bytes went direct; the rest are
// in the page cache (the caller may start their writeback). Either way all
// len bytes are written, or an error is returned.
Status PwriteDirect(int direct_fd, int fd, const void* buf, size_t len, uint64_t off,
                    const std::string& what, const char* fault_point = nullptr,
                    size_t* direct_bytes = nullptr);

// PreadFull through `direct_fd` (the file opened with O_DIRECT, or -1) when
// buffer and offset are 4 KiB aligned: no copy through the page cache (the
// kernel writes dirty pages of the range back first, so the read sees every
// completed write). An unaligned len is rounded up to 4 KiB for the direct
// read when buf holds `cap` >= that many bytes (bytes past len are then
// clobbered, and come back short past the end of the file); else, and for what
// the filesystem refuses as direct I/O (EINVAL) or a short direct read leaves
// unaligned, the rest is read through `fd` (buffered). All len bytes are read
// or an error is returned: the end of the file before len is an IoError.
Status PreadDirect(int direct_fd, int fd, void* buf, size_t len, uint64_t off,
                   const std::string& what, const char* fault_point = nullptr, size_t cap = 0);

// lseek(fd, pos, SEEK_DATA): the first offset at or after pos that holds data,
// or kNoData when none does (a hole to the end of the file, or pos at or past
// it). A filesystem without SEEK_DATA (EINVAL, EOPNOTSUPP) counts as all
// data: pos itself. Blocks while a buffered writer holds the inode lock.
inline constexpr uint64_t kNoData = UINT64_MAX;
Result<uint64_t> SeekData(int fd, uint64_t pos, const std::string& what);

// The whole content of a (small) file, read to its end (EINTR retried).
Result<std::string> ReadWholeFile(const std::string& path, const char* fault_point = nullptr);
// The same from a descriptor the caller opened (read from offset 0; `what`
// names it in errors).
Result<std::string> ReadWholeFile(int fd, const std::string& what,
                                  const char* fault_point = nullptr);

// Makes `dir/name` hold exactly `data`, atomically and durably: written to
// `name.tmp` (created with `mode`, less the umask), fdatasync'ed, renamed over `name`, `dir`
// fsync'ed. A crash leaves the old file (perhaps beside a stray .tmp) or the
// new one, never a mix, never an empty file; on an error the .tmp is removed
// and the old file is still there. `dir_fd`: `dir` kept open by the caller
// (-1: opened here for the fsync). `fault_point` names the write, the
// fdatasync, the rename and the directory fsync.
Status WriteFileAtomic(const std::string& dir, const std::string& name, const std::string& data,
                       unsigned mode, int dir_fd = -1, const char* fault_point = nullptr);

// fsync of a directory, so entries created, renamed or removed in it are durable.
Status FsyncDir(const std::string& dir, const char* fault_point = nullptr);
// The same on a directory the caller keeps open (`dir` names it in errors).
Status FsyncDir(int dir_fd, const std::string& dir, const char* fault_point = nullptr);

// mkdir -p. Each directory it creates gets exactly `mode` (chmod after mkdir,
// so the umask cannot widen or narrow it); existing ones are left as they are.
// An existing non-directory is an error. `created` (optional): whether `path`
// itself was created, so a caller can fsync its parent.
Status MakeDirs(const std::string& path, unsigned mode, bool* created = nullptr);

}  // namespace rpoint
