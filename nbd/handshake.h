// Fixed newstyle negotiation, run with blocking I/O on a short-lived thread.
//
// HandshakeChannel does exact reads and full writes on a connection with an
// overall deadline and a cancel descriptor (readable = give up now), so a slow,
// silent or malicious client can never hold a thread beyond the timeout nor
// delay server shutdown. Negotiate() implements the option haggling: GO, INFO,
// EXPORT_NAME, LIST, ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT
// (base:allocation and the resolver's rpoint: contexts), STARTTLS (as the listener's TlsPolicy says); unknown
// options are refused and haggling goes on. It never reads past the end of the
// handshake, so the transmission phase starts exactly at the client's first
// request (after STARTTLS, whatever ciphertext and plaintext the channel's
// TlsSession already holds goes with it to the transmission phase).
//
// Thread-safety: a channel belongs to one thread; Negotiate() only reaches the
// resolver, which is thread-safe.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/block_device.h"
#include "nbd/options.h"
#include "nbd/tls_config.h"
#include "nbd/tls_session.h"

namespace rpoint::nbd {

class HandshakeChannel {
 public:
  using Clock = std::chrono::steady_clock;
  // in_fd/out_fd may be the same socket; cancel_fd may be -1.
  HandshakeChannel(int in_fd, int out_fd, int cancel_fd, Clock::time_point deadline);

  // Reads exactly n bytes. Errors: peer closed, timeout, cancelled, I/O error.
  Status read(void* buf, size_t n);
  // Waits (the thread, never a reactor) until how_long passed, the deadline
  // or cancellation, whichever comes first.
  Status pause(std::chrono::milliseconds how_long);
  // Reads and drops n bytes.
  Status discard(size_t n);
  // Writes every byte of the iovecs.
  Status write(const iovec* iov, int iovcnt);
  Status write(const void* buf, size_t n);

  // Runs the TLS handshake over the connection (after STARTTLS was
  // acknowledged); from then on read() and write() go through the session.
  Status start_tls(std::unique_ptr<TlsSession> session);
  bool tls() const { return tls_ != nullptr; }
  std::unique_ptr<TlsSession> take_tls() { return std::move(tls_); }

 private:
  Status wait(int fd, short events);
  Status raw_read(void* buf, size_t n);
  Status raw_write(const iovec* iov, int iovcnt);
  // Receives whatever ciphertext is there (at least one byte) into the session.
  Status tls_fill();
  // Sends everything the session has staged.
  Status tls_flush();

  int in_fd_;
  int out_fd_;
  int cancel_fd_;
  bool in_socket_;
  bool out_socket_;
  Clock::time_point deadline_;
  std::unique_ptr<TlsSession> tls_;
};

// What the handshake agreed on; everything the transmission phase needs.
struct NegotiatedExport {
  std::shared_ptr<BlockDevice> device;
  // The client counted as attached (BlockDevice::users) from before the
  // reply that tells it so: a control call made the moment the client sees
  // the export open (GET attachedClients, DELETE without force) sees it.
  std::optional<BlockDevice::Use> use;
  std::string name;
  uint64_t size = 0;
  bool structured = false;
  bool base_allocation = false;  // base:allocation selected for this export
  uint32_t base_allocation_id = 0;
  // Further contexts selected (rpoint:changed:...), context id kFirstContextId + i.
  std::vector<std::shared_ptr<MetaContext>> contexts;
  uint16_t tx_flags = 0;
  BlockSizes sizes;
  // Largest READ/WRITE/CACHE accepted: sizes.maximum for a client that asked
  // for NBD_INFO_BLOCK_SIZE (it promised to honour it), else at least
  // kUnnegotiatedMaxRequest.
  uint32_t max_request = 0;
  // Set when the client upgraded with STARTTLS: transmission runs over it.
  std::unique_ptr<TlsSession> tls;
};

// Clients that never asked for block sizes (NBD_OPT_EXPORT_NAME, or GO without
// NBD_INFO_BLOCK_SIZE) know nothing of our maximum; the kernel client and
// nbd-tester-client send requests up to this size, which nbdkit accepts too.
inline constexpr uint32_t kUnnegotiatedMaxRequest = 64u << 20;

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
                                   uint32_t max_payload, const TlsPolicy& tls = {});

}  // namespace rpoint::nbd
