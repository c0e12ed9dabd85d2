#include "common/file_io.h"

#include <unistd.h>

#include <cerrno>

#include "common/fault_injection.h"
#include "common/thread_role.h"

namespace rpoint {

Status PreadFull(int fd, void* buf, size_t len, uint64_t off, const std::string& what) {
  RPOINT_ASSERT_MAY_BLOCK("pread");
  auto* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + what);
    }
    if (n == 0) return Status::IoError("read " + what + ": unexpected end of file");
    p += n;
    len -= size_t(n);
    off += uint64_t(n);
  }
  return Status::Ok();
}

Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, const std::string& what,
                  const char* fault_point) {
  const auto* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = fault::Pwrite(fault_point, fd, p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write " + what);
    }
    // A regular file never takes 0 bytes of a non-empty write without an error.
    if (n == 0) return Status::IoError("write " + what + ": no progress");
    p += n;
    len -= size_t(n);
    off += uint64_t(n);
  }
  return Status::Ok();
}

}  // namespace rpoint
