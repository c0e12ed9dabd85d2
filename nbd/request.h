// Transmission-phase request parsing and validation, kept free of I/O so the
// rules can be unit-tested byte for byte.
//
// ValidateRequest() decides, from what was negotiated, whether a request is
// served or answered with an NBD error (and which one, as proto.md's "Error
// values" section recommends). WritePayloadAction() decides what happens to a
// WRITE payload the server will not use: read and dropped, or too large to be
// worth reading (the connection is then closed).
//
// Thread-safety: pure functions over plain values.
#pragma once

#include <cstdint>

#include "nbd/protocol.h"

namespace rpoint::nbd {

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// Parses the 28-byte request header at p. False when the magic is wrong (the
// stream is then out of sync and the connection must be closed).
bool ParseRequest(const uint8_t* p, Request* out);
// Encodes a request (tests and tools).
void EncodeRequest(const Request& r, uint8_t* out);

// What the connection negotiated, as the validator needs it.
struct TransmissionContext {
  uint64_t export_size = 0;
  uint16_t tx_flags = 0;        // transmission flags sent to the client
  bool structured = false;      // NBD_OPT_STRUCTURED_REPLY acknowledged
  bool base_allocation = false; // base:allocation selected for this export
  bool other_contexts = false;  // some rpoint: context selected for this export
  uint32_t min_block = 1;       // advertised minimum block size (power of 2)
  uint32_t max_payload = 32u << 20;  // advertised maximum block size
};

struct Verdict {
  uint32_t error = 0;            // 0: serve it; else the NBD error to reply with
  const char* message = nullptr; // for structured error chunks and logs
  bool ok() const { return error == 0; }
};

Verdict ValidateRequest(const Request& r, const TransmissionContext& ctx);

// Largest WRITE payload the server reads (and drops) when it refuses the
// request; above this the connection is closed instead. The spec says lengths
// below 2^25 should never be treated as a denial of service.
inline constexpr uint32_t kMinDosPayload = 32u << 20;

enum class PayloadAction {
  kRead,        // payload read into a buffer and written
  kSkip,        // payload read and dropped; an error reply is sent
  kDisconnect,  // payload too large to read: close the connection
};
PayloadAction WritePayloadAction(const Request& r, const Verdict& v, uint32_t max_payload);

}  // namespace rpoint::nbd
