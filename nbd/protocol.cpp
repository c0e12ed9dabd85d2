#include "nbd/protocol.h"

#include <cerrno>

namespace rpoint::nbd {

const char* CommandName(uint16_t type) {
  switch (type) {
    case kCmdRead: return "READ";
    case kCmdWrite: return "WRITE";
    case kCmdDisc: return "DISC";
    case kCmdFlush: return "FLUSH";
    case kCmdTrim: return "TRIM";
    case kCmdCache: return "CACHE";
    case kCmdWriteZeroes: return "WRITE_ZEROES";
    case kCmdBlockStatus: return "BLOCK_STATUS";
    default: return "UNKNOWN";
  }
}

const char* OptionName(uint32_t option) {
  switch (option) {
    case kOptExportName: return "EXPORT_NAME";
    case kOptAbort: return "ABORT";
    case kOptList: return "LIST";
    case kOptPeekExport: return "PEEK_EXPORT";
    case kOptStartTls: return "STARTTLS";
    case kOptInfo: return "INFO";
    case kOptGo: return "GO";
    case kOptStructuredReply: return "STRUCTURED_REPLY";
    case kOptListMetaContext: return "LIST_META_CONTEXT";
    case kOptSetMetaContext: return "SET_META_CONTEXT";
    case kOptExtendedHeaders: return "EXTENDED_HEADERS";
    default: return "UNKNOWN";
  }
}

uint32_t ErrnoToNbd(int err) {
  switch (err) {
    case 0: return 0;
    case EPERM:
    case EROFS:
    case EACCES: return kEperm;
    case ENOMEM: return kEnomem;
    case EINVAL:
    case ERANGE: return kEinval;
    // The spec asks for EDQUOT and EFBIG to be reported as ENOSPC.
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return kEnospc;
    case EOVERFLOW: return kEoverflow;
    case ENOTSUP:  // == EOPNOTSUPP on Linux
      return kEnotsup;
    case ESHUTDOWN: return kEshutdown;
    default: return kEio;
  }
}

}  // namespace rpoint::nbd
