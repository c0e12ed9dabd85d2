// Whole-buffer pread/pwrite: the loops every file writer needs (a short
// transfer is continued, EINTR retried), shared by the store and the engine.
// Each write may name a fault point (common/fault_injection.h).
// Thread-safety: stateless functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"

namespace rpoint {

// Reads exactly len bytes at off; a short read (end of file) is an IoError.
Status PreadFull(int fd, void* buf, size_t len, uint64_t off, const std::string& what);
// Writes all len bytes at off, continuing short writes.
Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, const std::string& what,
                  const char* fault_point = nullptr);

}  // namespace rpoint
