#include "common/status.h"

#include <cerrno>
#include <cstring>

namespace rpoint {

Status Status::FromErrno(int err, const std::string& context) {
  std::string msg = context + ": " + std::strerror(err);
  switch (err) {
    case 0: return Ok();
    case ENOENT: return NotFound(msg);
    case EEXIST: return AlreadyExists(msg);
    case EBUSY: return Conflict(msg);
    case EINVAL: return InvalidArgument(msg);
    case ENOSPC:
    case EDQUOT: return NoSpace(msg);
    case EPERM:
    case EACCES:
    case EROFS: return PermissionDenied(msg);
    case EOPNOTSUPP: return Unsupported(msg);
    case EFBIG:
    case EOVERFLOW: return OutOfRange(msg);
    case ESHUTDOWN: return Shutdown(msg);
    default: return IoError(msg);
  }
}

const char* Status::code_name() const {
  switch (code_) {
    case Code::kOk: return "Ok";
    case Code::kInvalidArgument: return "InvalidArgument";
    case Code::kNotFound: return "NotFound";
    case Code::kAlreadyExists: return "AlreadyExists";
    case Code::kConflict: return "Conflict";
    case Code::kOutOfRange: return "OutOfRange";
    case Code::kNoSpace: return "NoSpace";
    case Code::kPermissionDenied: return "PermissionDenied";
    case Code::kUnsupported: return "Unsupported";
    case Code::kIoError: return "IoError";
    case Code::kCorruption: return "Corruption";
    case Code::kShutdown: return "Shutdown";
    case Code::kInternal: return "Internal";
    case Code::kUnavailable: return "Unavailable";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return std::string(code_name()) + ": " + message_;
}

}  // namespace rpoint
