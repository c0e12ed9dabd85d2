// NBD wire protocol: constants, big-endian helpers and message layouts.
//
// Every value here is checked against doc/proto.md of the NetworkBlockDevice
// project (sections "Fixed newstyle negotiation", "Transmission", "Structured
// reply chunk message" and "Values"). Layouts are described as byte offsets
// and encoded/decoded with the helpers below rather than packed structs, so no
// alignment or endianness assumption leaks into the rest of the code.
//
// Thread-safety: constants and pure functions only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace rpoint::nbd {

// ---- Big-endian helpers ----------------------------------------------------

inline uint16_t Get16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_bswap16(v);
}
inline uint32_t Get32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_bswap32(v);
}
inline uint64_t Get64(const void* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_bswap64(v);
}
inline void Put16(void* p, uint16_t v) {
  v = __builtin_bswap16(v);
  std::memcpy(p, &v, sizeof(v));
}
inline void Put32(void* p, uint32_t v) {
  v = __builtin_bswap32(v);
  std::memcpy(p, &v, sizeof(v));
}
inline void Put64(void* p, uint64_t v) {
  v = __builtin_bswap64(v);
  std::memcpy(p, &v, sizeof(v));
}

// ---- Magic numbers ---------------------------------------------------------

inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;     // "NBDMAGIC" (INIT_PASSWD)
inline constexpr uint64_t kIHaveOpt = 0x49484156454F5054ull;     // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x3e889045565a9ull;   // option reply
inline constexpr uint32_t kRequestMagic = 0x25609513u;           // NBD_REQUEST_MAGIC
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698u;       // NBD_SIMPLE_REPLY_MAGIC
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33efu;   // NBD_STRUCTURED_REPLY_MAGIC

// ---- Handshake flags (16 bits, server) and client flags (32 bits) ----------

inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;  // NBD_FLAG_FIXED_NEWSTYLE
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;       // NBD_FLAG_NO_ZEROES
inline constexpr uint32_t kClientFlagFixedNewstyle = 1u << 0;  // NBD_FLAG_C_FIXED_NEWSTYLE
inline constexpr uint32_t kClientFlagNoZeroes = 1u << 1;       // NBD_FLAG_C_NO_ZEROES
inline constexpr uint32_t kClientFlagsKnown = kClientFlagFixedNewstyle | kClientFlagNoZeroes;

// ---- Transmission flags (16 bits) ------------------------------------------

inline constexpr uint16_t kTxHasFlags = 1u << 0;         // NBD_FLAG_HAS_FLAGS (always set)
inline constexpr uint16_t kTxReadOnly = 1u << 1;         // NBD_FLAG_READ_ONLY
inline constexpr uint16_t kTxSendFlush = 1u << 2;        // NBD_FLAG_SEND_FLUSH
inline constexpr uint16_t kTxSendFua = 1u << 3;          // NBD_FLAG_SEND_FUA
inline constexpr uint16_t kTxRotational = 1u << 4;       // NBD_FLAG_ROTATIONAL
inline constexpr uint16_t kTxSendTrim = 1u << 5;         // NBD_FLAG_SEND_TRIM
inline constexpr uint16_t kTxSendWriteZeroes = 1u << 6;  // NBD_FLAG_SEND_WRITE_ZEROES
inline constexpr uint16_t kTxSendDf = 1u << 7;           // NBD_FLAG_SEND_DF
inline constexpr uint16_t kTxCanMultiConn = 1u << 8;     // NBD_FLAG_CAN_MULTI_CONN
inline constexpr uint16_t kTxSendResize = 1u << 9;       // NBD_FLAG_SEND_RESIZE (not used)
inline constexpr uint16_t kTxSendCache = 1u << 10;       // NBD_FLAG_SEND_CACHE
inline constexpr uint16_t kTxSendFastZero = 1u << 11;    // NBD_FLAG_SEND_FAST_ZERO

// ---- Options (handshake phase) ---------------------------------------------

inline constexpr uint32_t kOptExportName = 1;       // NBD_OPT_EXPORT_NAME
inline constexpr uint32_t kOptAbort = 2;            // NBD_OPT_ABORT
inline constexpr uint32_t kOptList = 3;             // NBD_OPT_LIST
inline constexpr uint32_t kOptPeekExport = 4;       // withdrawn
inline constexpr uint32_t kOptStartTls = 5;         // NBD_OPT_STARTTLS
inline constexpr uint32_t kOptInfo = 6;             // NBD_OPT_INFO
inline constexpr uint32_t kOptGo = 7;               // NBD_OPT_GO
inline constexpr uint32_t kOptStructuredReply = 8;  // NBD_OPT_STRUCTURED_REPLY
inline constexpr uint32_t kOptListMetaContext = 9;  // NBD_OPT_LIST_META_CONTEXT
inline constexpr uint32_t kOptSetMetaContext = 10;  // NBD_OPT_SET_META_CONTEXT
inline constexpr uint32_t kOptExtendedHeaders = 11; // NBD_OPT_EXTENDED_HEADERS (not supported)

// ---- Option reply types ----------------------------------------------------

inline constexpr uint32_t kRepAck = 1;          // NBD_REP_ACK
inline constexpr uint32_t kRepServer = 2;       // NBD_REP_SERVER
inline constexpr uint32_t kRepInfo = 3;         // NBD_REP_INFO
inline constexpr uint32_t kRepMetaContext = 4;  // NBD_REP_META_CONTEXT
inline constexpr uint32_t kRepErrBit = 1u << 31;
inline constexpr uint32_t kRepErrUnsup = kRepErrBit + 1;          // NBD_REP_ERR_UNSUP
inline constexpr uint32_t kRepErrPolicy = kRepErrBit + 2;         // NBD_REP_ERR_POLICY
inline constexpr uint32_t kRepErrInvalid = kRepErrBit + 3;        // NBD_REP_ERR_INVALID
inline constexpr uint32_t kRepErrPlatform = kRepErrBit + 4;       // NBD_REP_ERR_PLATFORM
inline constexpr uint32_t kRepErrTlsReqd = kRepErrBit + 5;        // NBD_REP_ERR_TLS_REQD
inline constexpr uint32_t kRepErrUnknown = kRepErrBit + 6;        // NBD_REP_ERR_UNKNOWN
inline constexpr uint32_t kRepErrShutdown = kRepErrBit + 7;       // NBD_REP_ERR_SHUTDOWN
inline constexpr uint32_t kRepErrBlockSizeReqd = kRepErrBit + 8;  // NBD_REP_ERR_BLOCK_SIZE_REQD
inline constexpr uint32_t kRepErrTooBig = kRepErrBit + 9;         // NBD_REP_ERR_TOO_BIG

// ---- NBD_REP_INFO information types ----------------------------------------

inline constexpr uint16_t kInfoExport = 0;       // NBD_INFO_EXPORT
inline constexpr uint16_t kInfoName = 1;         // NBD_INFO_NAME
inline constexpr uint16_t kInfoDescription = 2;  // NBD_INFO_DESCRIPTION
inline constexpr uint16_t kInfoBlockSize = 3;    // NBD_INFO_BLOCK_SIZE

// ---- Commands and command flags (transmission phase) -----------------------

inline constexpr uint16_t kCmdRead = 0;         // NBD_CMD_READ
inline constexpr uint16_t kCmdWrite = 1;        // NBD_CMD_WRITE
inline constexpr uint16_t kCmdDisc = 2;         // NBD_CMD_DISC
inline constexpr uint16_t kCmdFlush = 3;        // NBD_CMD_FLUSH
inline constexpr uint16_t kCmdTrim = 4;         // NBD_CMD_TRIM
inline constexpr uint16_t kCmdCache = 5;        // NBD_CMD_CACHE
inline constexpr uint16_t kCmdWriteZeroes = 6;  // NBD_CMD_WRITE_ZEROES
inline constexpr uint16_t kCmdBlockStatus = 7;  // NBD_CMD_BLOCK_STATUS

inline constexpr uint16_t kCmdFlagFua = 1u << 0;       // NBD_CMD_FLAG_FUA
inline constexpr uint16_t kCmdFlagNoHole = 1u << 1;    // NBD_CMD_FLAG_NO_HOLE
inline constexpr uint16_t kCmdFlagDf = 1u << 2;        // NBD_CMD_FLAG_DF
inline constexpr uint16_t kCmdFlagReqOne = 1u << 3;    // NBD_CMD_FLAG_REQ_ONE
inline constexpr uint16_t kCmdFlagFastZero = 1u << 4;  // NBD_CMD_FLAG_FAST_ZERO

// ---- Structured replies ----------------------------------------------------

inline constexpr uint16_t kReplyFlagDone = 1u << 0;  // NBD_REPLY_FLAG_DONE

inline constexpr uint16_t kReplyTypeNone = 0;            // NBD_REPLY_TYPE_NONE
inline constexpr uint16_t kReplyTypeOffsetData = 1;      // NBD_REPLY_TYPE_OFFSET_DATA
inline constexpr uint16_t kReplyTypeOffsetHole = 2;      // NBD_REPLY_TYPE_OFFSET_HOLE
inline constexpr uint16_t kReplyTypeBlockStatus = 5;     // NBD_REPLY_TYPE_BLOCK_STATUS
inline constexpr uint16_t kReplyTypeError = (1u << 15) + 1;        // NBD_REPLY_TYPE_ERROR
inline constexpr uint16_t kReplyTypeErrorOffset = (1u << 15) + 2;  // NBD_REPLY_TYPE_ERROR_OFFSET

// ---- Error values (the only ones allowed on the wire) ----------------------

inline constexpr uint32_t kEperm = 1;
inline constexpr uint32_t kEio = 5;
inline constexpr uint32_t kEnomem = 12;
inline constexpr uint32_t kEinval = 22;
inline constexpr uint32_t kEnospc = 28;
inline constexpr uint32_t kEoverflow = 75;
inline constexpr uint32_t kEnotsup = 95;
inline constexpr uint32_t kEshutdown = 108;

// ---- base:allocation metadata context --------------------------------------

inline constexpr const char* kBaseAllocation = "base:allocation";
inline constexpr uint32_t kStateHole = 1u << 0;  // NBD_STATE_HOLE
inline constexpr uint32_t kStateZero = 1u << 1;  // NBD_STATE_ZERO

// ---- Sizes -----------------------------------------------------------------

// Greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
inline constexpr size_t kGreetingSize = 18;
// Option request header: IHAVEOPT, option, length.
inline constexpr size_t kOptionHeaderSize = 16;
// Option reply header: magic, option, reply type, length.
inline constexpr size_t kOptionReplyHeaderSize = 20;
// NBD_OPT_EXPORT_NAME reply: size, transmission flags, then 124 zero bytes unless NO_ZEROES.
inline constexpr size_t kExportNameReplySize = 10;
inline constexpr size_t kExportNameZeroes = 124;

// Request: magic(4) flags(2) type(2) cookie(8) offset(8) length(4).
inline constexpr size_t kRequestSize = 28;
// Simple reply: magic(4) error(4) cookie(8).
inline constexpr size_t kSimpleReplySize = 16;
// Structured reply chunk header: magic(4) flags(2) type(2) cookie(8) length(4).
inline constexpr size_t kStructuredReplySize = 20;

// Strings (export names, queries, messages) MUST be no longer than 4096 bytes.
inline constexpr size_t kMaxStringSize = 4096;

// Command and reply-type names for logs.
const char* CommandName(uint16_t type);
const char* OptionName(uint32_t option);

// Maps an errno value (positive, as from -cqe->res) onto the NBD error set.
uint32_t ErrnoToNbd(int err);

}  // namespace rpoint::nbd
