#include "nbd/request.h"

#include <algorithm>

namespace rpoint::nbd {
namespace {

constexpr uint16_t kKnownCmdFlags =
    kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;

Verdict Fail(uint32_t error, const char* message) { return Verdict{error, message}; }

bool InRange(uint64_t offset, uint32_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

bool Aligned(const Request& r, uint32_t min_block) {
  if (min_block <= 1) return true;
  uint64_t mask = min_block - 1;
  return (r.offset & mask) == 0 && (r.length & mask) == 0;
}

// Flags that are only valid on one command (FUA is valid on all of them once
// SEND_FUA was advertised: the spec says the server MUST then accept it).
Verdict CheckFlags(const Request& r, const TransmissionContext& ctx) {
  if (r.flags & ~kKnownCmdFlags) return Fail(kEinval, "unknown command flags");
  if ((r.flags & kCmdFlagFua) && !(ctx.tx_flags & kTxSendFua)) {
    return Fail(kEinval, "FUA flag not negotiated");
  }
  if ((r.flags & kCmdFlagNoHole) && r.type != kCmdWriteZeroes) {
    return Fail(kEinval, "NO_HOLE flag is only valid on WRITE_ZEROES");
  }
  if (r.flags & kCmdFlagDf) {
    if (r.type != kCmdRead) return Fail(kEinval, "DF flag is only valid on READ");
    if (!(ctx.tx_flags & kTxSendDf)) return Fail(kEinval, "DF flag not negotiated");
  }
  if ((r.flags & kCmdFlagReqOne) && r.type != kCmdBlockStatus) {
    return Fail(kEinval, "REQ_ONE flag is only valid on BLOCK_STATUS");
  }
  if (r.flags & kCmdFlagFastZero) {
    if (r.type != kCmdWriteZeroes) return Fail(kEinval, "FAST_ZERO flag is only valid on WRITE_ZEROES");
    if (!(ctx.tx_flags & kTxSendFastZero)) return Fail(kEinval, "FAST_ZERO flag not negotiated");
  }
  return {};
}

}  // namespace

bool ParseRequest(const uint8_t* p, Request* out) {
  if (Get32(p) != kRequestMagic) return false;
  out->flags = Get16(p + 4);
  out->type = Get16(p + 6);
  out->cookie = Get64(p + 8);
  out->offset = Get64(p + 16);
  out->length = Get32(p + 24);
  return true;
}

void EncodeRequest(const Request& r, uint8_t* out) {
  Put32(out, kRequestMagic);
  Put16(out + 4, r.flags);
  Put16(out + 6, r.type);
  Put64(out + 8, r.cookie);
  Put64(out + 16, r.offset);
  Put32(out + 24, r.length);
}

Verdict ValidateRequest(const Request& r, const TransmissionContext& ctx) {
  const bool read_only = ctx.tx_flags & kTxReadOnly;
  switch (r.type) {
    case kCmdDisc:
      return {};  // no reply is ever sent, so there is nothing to refuse
    case kCmdRead:
    case kCmdWrite:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdCache:
    case kCmdWriteZeroes:
    case kCmdBlockStatus:
      break;
    default:
      return Fail(kEinval, "unknown command");
  }
  if (Verdict v = CheckFlags(r, ctx); !v.ok()) return v;

  switch (r.type) {
    case kCmdRead:
      if (r.length == 0) return Fail(kEinval, "zero-length read");
      if (r.length > ctx.max_payload) return Fail(kEinval, "read larger than the maximum block size");
      if (!Aligned(r, ctx.min_block)) return Fail(kEinval, "read not aligned to the minimum block size");
      if (!InRange(r.offset, r.length, ctx.export_size)) return Fail(kEinval, "read beyond the end of the export");
      return {};
    case kCmdWrite:
      if (read_only) return Fail(kEperm, "export is read-only");
      if (r.length == 0) return Fail(kEinval, "zero-length write");
      if (r.length > ctx.max_payload) return Fail(kEinval, "write larger than the maximum block size");
      if (!Aligned(r, ctx.min_block)) return Fail(kEinval, "write not aligned to the minimum block size");
      if (!InRange(r.offset, r.length, ctx.export_size)) return Fail(kEnospc, "write beyond the end of the export");
      return {};
    case kCmdFlush:
      if (!(ctx.tx_flags & kTxSendFlush)) return Fail(kEinval, "FLUSH not negotiated");
      if (r.offset != 0 || r.length != 0) return Fail(kEinval, "FLUSH offset and length must be zero");
      return {};
    case kCmdTrim:
      if (read_only) return Fail(kEperm, "export is read-only");
      if (!(ctx.tx_flags & kTxSendTrim)) return Fail(kEinval, "TRIM not negotiated");
      if (r.length == 0) return Fail(kEinval, "zero-length trim");
      if (!Aligned(r, ctx.min_block)) return Fail(kEinval, "trim not aligned to the minimum block size");
      if (!InRange(r.offset, r.length, ctx.export_size)) return Fail(kEinval, "trim beyond the end of the export");
      return {};
    case kCmdCache:
      if (!(ctx.tx_flags & kTxSendCache)) return Fail(kEinval, "CACHE not negotiated");
      if (r.length == 0) return Fail(kEinval, "zero-length cache");
      if (r.length > ctx.max_payload) return Fail(kEinval, "cache larger than the maximum block size");
      if (!Aligned(r, ctx.min_block)) return Fail(kEinval, "cache not aligned to the minimum block size");
      if (!InRange(r.offset, r.length, ctx.export_size)) return Fail(kEinval, "cache beyond the end of the export");
      return {};
    case kCmdWriteZeroes:
      if (read_only) return Fail(kEperm, "export is read-only");
      if (!(ctx.tx_flags & kTxSendWriteZeroes)) return Fail(kEinval, "WRITE_ZEROES not negotiated");
      if (r.length == 0) return Fail(kEinval, "zero-length write zeroes");
      if (!Aligned(r, ctx.min_block)) return Fail(kEinval, "write zeroes not aligned to the minimum block size");
      if (!InRange(r.offset, r.length, ctx.export_size)) return Fail(kEnospc, "write zeroes beyond the end of the export");
      return {};
    case kCmdBlockStatus:
      if (!ctx.structured || (!ctx.base_allocation && !ctx.other_contexts)) {
        return Fail(kEinval, "BLOCK_STATUS without a negotiated metadata context");
      }
      if (r.length == 0) return Fail(kEinval, "zero-length block status");
      if (!Aligned(r, ctx.min_block)) return Fail(kEinval, "block status not aligned to the minimum block size");
      if (!InRange(r.offset, r.length, ctx.export_size)) return Fail(kEinval, "block status beyond the end of the export");
      return {};
  }
  return Fail(kEinval, "unknown command");
}

PayloadAction WritePayloadAction(const Request& r, const Verdict& v, uint32_t max_payload) {
  if (r.length > std::max(max_payload, kMinDosPayload)) return PayloadAction::kDisconnect;
  return v.ok() ? PayloadAction::kRead : PayloadAction::kSkip;
}

}  // namespace rpoint::nbd
