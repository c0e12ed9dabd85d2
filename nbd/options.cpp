#include "nbd/options.h"

#include <algorithm>

namespace rpoint::nbd {
namespace {

// Reads a 32-bit length-prefixed string; false if it overruns or is too long.
bool TakeString(const uint8_t* data, size_t len, size_t* pos, std::string* out) {
  if (len - *pos < 4) return false;
  uint32_t n = Get32(data + *pos);
  *pos += 4;
  if (n > kMaxStringSize || n > len - *pos) return false;
  out->assign(reinterpret_cast<const char*>(data + *pos), n);
  *pos += n;
  return true;
}

bool IsPowerOf2(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint32_t FloorPowerOf2(uint32_t v) {
  uint32_t p = 1;
  while (p <= v / 2) p <<= 1;
  return p;
}

}  // namespace

bool ParseInfoRequest(const uint8_t* data, size_t len, InfoRequest* out) {
  size_t pos = 0;
  if (!TakeString(data, len, &pos, &out->name)) return false;
  if (len - pos < 2) return false;
  uint16_t n = Get16(data + pos);
  pos += 2;
  if (len - pos != size_t{n} * 2) return false;
  out->infos.clear();
  for (uint16_t i = 0; i < n; ++i) out->infos.push_back(Get16(data + pos + 2 * i));
  return true;
}

bool ParseMetaContextRequest(const uint8_t* data, size_t len, MetaContextRequest* out) {
  size_t pos = 0;
  if (!TakeString(data, len, &pos, &out->export_name)) return false;
  if (len - pos < 4) return false;
  uint32_t n = Get32(data + pos);
  pos += 4;
  // Each query takes at least its 4-byte length: bound n before reserving.
  if (n > (len - pos) / 4) return false;
  out->queries.clear();
  for (uint32_t i = 0; i < n; ++i) {
    std::string q;
    if (!TakeString(data, len, &pos, &q)) return false;
    out->queries.push_back(std::move(q));
  }
  return pos == len;
}

bool SelectsBaseAllocation(const MetaContextRequest& req, MetaMode mode) {
  if (req.queries.empty()) return mode == MetaMode::kList;
  for (const std::string& q : req.queries) {
    if (q == kBaseAllocation) return true;
    if (mode == MetaMode::kList && q == "base:") return true;
  }
  return false;
}

bool IsResolverContextQuery(const std::string& query) {
  return query.rfind(kRpointNamespace, 0) == 0;
}

bool WantsResolverContexts(const MetaContextRequest& req) {
  if (req.queries.empty()) return true;
  return std::any_of(req.queries.begin(), req.queries.end(), IsResolverContextQuery);
}

bool ListQueryMatches(const MetaContextRequest& req, const std::string& name) {
  if (req.queries.empty()) return true;
  for (const std::string& q : req.queries) {
    if (q == name) return true;
    if (IsResolverContextQuery(q) && q.back() == ':' && name.rfind(q, 0) == 0) return true;
  }
  return false;
}

uint16_t TransmissionFlags(const DeviceCaps& caps, bool structured) {
  uint16_t f = kTxHasFlags | kTxSendCache;
  if (caps.read_only) f |= kTxReadOnly;
  if (caps.can_flush) f |= kTxSendFlush;
  if (!caps.read_only) {
    f |= kTxSendFua;
    if (caps.can_trim) f |= kTxSendTrim;
    // FAST_ZERO may be advertised even when every fast request fails with
    // ENOTSUP; that fast failure is exactly what copy tools want to learn.
    if (caps.can_zero) f |= kTxSendWriteZeroes | kTxSendFastZero;
  }
  if (caps.rotational) f |= kTxRotational;
  if (caps.can_multi_conn) f |= kTxCanMultiConn;
  // Reads are always one OFFSET_DATA chunk, so "don't fragment" costs nothing.
  if (structured) f |= kTxSendDf;
  return f;
}

BlockSizes ComputeBlockSizes(const DeviceCaps& caps, uint32_t max_payload) {
  BlockSizes b;
  uint32_t min = caps.min_block == 0 ? 1 : caps.min_block;
  if (!IsPowerOf2(min)) min = FloorPowerOf2(min);
  b.minimum = std::min<uint32_t>(min, 65536);
  uint32_t pref = std::max<uint32_t>({caps.preferred_block, 4096, b.minimum});
  if (!IsPowerOf2(pref)) pref = FloorPowerOf2(pref) * 2;
  b.preferred = pref;
  uint32_t max = std::max(max_payload, b.preferred);
  b.maximum = max - max % b.minimum;
  return b;
}

}  // namespace rpoint::nbd
