// Handshake-phase option payload parsing and the values the server advertises
// (transmission flags, block sizes, metadata contexts), kept free of I/O so they
// can be unit-tested.
//
// Thread-safety: pure functions over plain values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/block_device.h"
#include "nbd/protocol.h"

namespace rpoint::nbd {

// NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, info types.
struct InfoRequest {
  std::string name;
  std::vector<uint16_t> infos;
};
// False when the data is malformed (lengths inconsistent with the option
// length): the server answers NBD_REP_ERR_INVALID.
bool ParseInfoRequest(const uint8_t* data, size_t len, InfoRequest* out);

// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: export name
// length, name, query count, then (length, query) pairs.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};
bool ParseMetaContextRequest(const uint8_t* data, size_t len, MetaContextRequest* out);

enum class MetaMode { kList, kSet };
// Whether the request selects (kSet) or lists (kList) base:allocation. Per the
// spec: no queries lists everything but selects nothing; "base:" is a wildcard
// for listing only; unknown leaf names and unknown namespaces are ignored.
bool SelectsBaseAllocation(const MetaContextRequest& req, MetaMode mode);

// Contexts of the "rpoint:" namespace come from the ExportResolver
// (rpoint:changed:{collection}/{point} on restore point exports).
inline constexpr const char* kRpointNamespace = "rpoint:";
bool IsResolverContextQuery(const std::string& query);
// LIST: whether the resolver's contexts are wanted at all (no queries, or one
// in the rpoint: namespace), and whether `name` answers one of the queries:
// an exact name, or a query ending in ':' that prefixes it ("rpoint:" lists
// the namespace, "rpoint:changed:" every changed-block context).
bool WantsResolverContexts(const MetaContextRequest& req);
bool ListQueryMatches(const MetaContextRequest& req, const std::string& name);

// Transmission flags for a device, given whether structured replies were
// negotiated (NBD_FLAG_SEND_DF is only allowed with them).
uint16_t TransmissionFlags(const DeviceCaps& caps, bool structured);

struct BlockSizes {
  uint32_t minimum = 1;
  uint32_t preferred = 4096;
  uint32_t maximum = 32u << 20;
};
// Follows "Block size constraints": minimum a power of 2 <= 64 KiB, preferred a
// power of 2 >= max(minimum, 512), maximum a multiple of the minimum.
BlockSizes ComputeBlockSizes(const DeviceCaps& caps, uint32_t max_payload);

}  // namespace rpoint::nbd
