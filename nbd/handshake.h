// Fixed newstyle negotiation, run with blocking I/O on a short-lived thread.
//
// HandshakeChannel does exact reads and full writes on a connection with an
// overall deadline and a cancel descriptor (readable = give up now), so a slow,
// silent or malicious client can never hold a thread beyond the timeout nor
// delay server shutdown. Negotiate() implements the option haggling: GO, INFO,
// EXPORT_NAME, LIST, ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT
// (base:allocation and the resolver's rpoint: contexts); STARTTLS and unknown options are refused
// and haggling goes on. It never reads past the end of the handshake, so the transmission phase
// starts exactly at the client's first request.
//
// Thread-safety: a channel belongs to one thread; Negotiate() only reaches the
// resolver, which is thread-safe.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/block_device.h"
#include "nbd/options.h"

namespace rpoint::nbd {

class HandshakeChannel {
 public:
  using Clock = std::chrono::steady_clock;
  // in_fd/out_fd may be the same socket; cancel_fd may be -1.
  HandshakeChannel(int in_fd, int out_fd, int cancel_fd, Clock::time_point deadline);

  // Reads exactly n bytes. Errors: peer closed, timeout, cancelled, I/O error.
  Status read(void* buf, size_t n);
  // Reads and drops n bytes.
  Status discard(size_t n);
  // Writes every byte of the iovecs.
  Status write(const iovec* iov, int iovcnt);
  Status write(const void* buf, size_t n);

 private:
  Status wait(int fd, short events);

  int in_fd_;
  int out_fd_;
  int cancel_fd_;
  bool in_socket_;
  bool out_socket_;
  Clock::time_point deadline_;
};

// What the handshake agreed on; everything the transmission phase needs.
struct NegotiatedExport {
  std::shared_ptr<BlockDevice> device;
  std::string name;
  uint64_t size = 0;
  bool structured = false;
  bool base_allocation = false;  // base:allocation selected for this export
  uint32_t base_allocation_id = 0;
  // Further contexts selected (rpoint:changed:...), context id kFirstContextId + i.
  std::vector<std::shared_ptr<MetaContext>> contexts;
  uint16_t tx_flags = 0;
  BlockSizes sizes;
};

// Option data above this is refused with NBD_REP_ERR_TOO_BIG (after reading
// it, up to kMaxSkippedOption; beyond that the connection is closed).
inline constexpr uint32_t kMaxOptionData = 64u << 10;
inline constexpr uint32_t kMaxSkippedOption = 1u << 20;
// Metadata context ID handed out for base:allocation.
inline constexpr uint32_t kBaseAllocationId = 1;
// IDs of the resolver's contexts (NegotiatedExport::contexts) start here.
inline constexpr uint32_t kFirstContextId = 2;

// Runs the whole negotiation. On success the connection is in transmission
// phase. On any error the caller closes the connection (client aborted or
// vanished, protocol violation, unknown export with EXPORT_NAME, timeout,
// cancellation).
Result<NegotiatedExport> Negotiate(HandshakeChannel& ch, ExportResolver& resolver,
                                   uint32_t max_payload);

}  // namespace rpoint::nbd
