// TlsSession: one server-side GnuTLS session whose ciphertext moves through
// memory buffers, never through a descriptor GnuTLS would read or write
// itself. The caller moves the bytes: the handshake thread with poll() and
// non-blocking recv/send, the reactor with io_uring. GnuTLS only ever sees
// "would block" (EAGAIN) from its transport, so no call here blocks.
//
//  - Input: the caller receives ciphertext into input_space() and
//    commit_input()s it; recv() and handshake() consume it.
//  - Output: handshake(), send() and close_notify() append records to a
//    staging buffer. start_flight() moves everything staged into the flight
//    buffer, whose bytes stay put until flight_done() has consumed them all,
//    so an io_uring send can point at them while GnuTLS stages more (a
//    TLS 1.3 KeyUpdate answer, say). Both buffers keep their capacity: the
//    steady state allocates nothing.
//
// Thread-safety: one thread at a time (the handshake thread, then the
// connection's reactor).
#pragma once

#include <gnutls/gnutls.h>
#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "nbd/tls_config.h"

namespace rpoint::nbd {

class TlsSession {
 public:
  // The session keeps `creds` alive: credentials reloaded meanwhile
  // (NbdServer::set_tls_credentials) serve new sessions only.
  static Result<std::unique_ptr<TlsSession>> CreateServer(
      std::shared_ptr<const TlsCredentials> creds);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  enum class Progress { kDone, kWantInput, kFailed };
  // One step of the handshake over the input received so far. kFailed:
  // error() says why; an alert for the client is staged.
  Progress handshake();

  // Plaintext. recv: bytes (> 0), 0 on the client's close_notify, kAgain when
  // more input is needed, kError (error() says why).
  static constexpr ssize_t kAgain = -1;
  static constexpr ssize_t kError = -2;
  ssize_t recv(void* buf, size_t n);
  // Encrypts all of buf into the staging buffer.
  Status send(const void* buf, size_t n);
  // Stages the close_notify alert.
  void close_notify();
  // Decrypted bytes GnuTLS holds that recv() returns without new input.
  bool has_buffered_plaintext() const;

  // Ciphertext from the client.
  char* input_space(size_t* len);
  void commit_input(size_t n);
  bool has_input() const { return in_pos_ < in_end_; }

  // Ciphertext to the client.
  bool has_staged() const { return !stage_.empty(); }
  // False when a flight is still under way or nothing is staged.
  bool start_flight();
  const char* flight_data() const { return flight_.data() + flight_pos_; }
  size_t flight_left() const { return flight_.size() - flight_pos_; }
  void flight_done(size_t n);

  const std::string& error() const { return error_; }
  // "TLS1.3 x509 'CN=client'" or "TLS1.3 psk 'alice'", for logs.
  std::string describe() const;

 private:
  explicit TlsSession(gnutls_session_t s);
  static ssize_t Push(gnutls_transport_ptr_t self, const void* data, size_t n);
  static ssize_t Pull(gnutls_transport_ptr_t self, void* data, size_t n);
  static int PullTimeout(gnutls_transport_ptr_t self, unsigned ms);

  struct SessionFree {
    void operator()(gnutls_session_t s) const { gnutls_deinit(s); }
  };
  std::shared_ptr<const TlsCredentials> creds_;  // outlives session_, which points into it
  std::unique_ptr<std::remove_pointer_t<gnutls_session_t>, SessionFree> session_;
  std::vector<char> in_;
  size_t in_pos_ = 0;
  size_t in_end_ = 0;
  std::vector<char> stage_;
  std::vector<char> flight_;
  size_t flight_pos_ = 0;
  std::string error_;
};

}  // namespace rpoint::nbd
