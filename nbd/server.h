// NbdServer: serves block devices over the NBD protocol (fixed newstyle).
//
// Knows nothing of disks, metadata or the control plane: it resolves export
// names through an ExportResolver and does all I/O through BlockDevice. Each
// accepted connection is negotiated (handshake, blocking, with a timeout) on a
// short-lived thread, then handed to a reactor of the pool for transmission.
//
// Thread-safety: add_listener/start/shutdown from the owning (main) thread;
// connection_count() from any thread.
#pragma once

#include <memory>

#include "common/status.h"
#include "common/unique_fd.h"
#include "engine/block_device.h"
#include "engine/reactor.h"
#include "nbd/tls_config.h"

namespace rpoint {

struct NbdServerOptions {
  unsigned handshake_timeout_seconds = 30;
  uint32_t max_payload = 32u << 20;  // largest READ/WRITE payload accepted
  // shutdown(): how long connections get to finish their requests and send
  // their replies before their sockets are cut.
  unsigned shutdown_grace_ms = 5000;
};

class NbdServer {
 public:
  static Result<std::unique_ptr<NbdServer>> Create(ExportResolver& resolver, ReactorPool& pool,
                                                   NbdServerOptions options);
  virtual ~NbdServer() = default;

  // Takes a socket that is already bound and listening (Unix or TCP; from
  // socket activation or opened by the daemon). `tls` is what its clients may
  // or must do (STARTTLS); its credentials are shared, loaded once. Its
  // clients resolve names through `resolver` when given (it must outlive the
  // server), else the server's own: a listener can serve a subset of the
  // exports.
  virtual Status add_listener(UniqueFd listening_fd, nbd::TlsPolicy tls = {},
                              ExportResolver* resolver = nullptr) = 0;
  // Replaces the credentials of every listener that has some (a TLS
  // certificate or PSK file reloaded on SIGHUP): handshakes that start from
  // now on use `creds`; sessions already made keep theirs.
  virtual void set_tls_credentials(std::shared_ptr<const nbd::TlsCredentials> creds) = 0;
  // Starts accepting on every listener.
  virtual void start() = 0;
  // Stops accepting, lets every connection finish the requests it has read,
  // sends their replies, flushes the devices, then closes. Blocks until done.
  virtual void shutdown() = 0;
  // Serves exactly one already-connected client (socket or stdio pair) on the
  // calling thread until it disconnects: fuzzing and tests.
  virtual void serve_one(UniqueFd in_fd, UniqueFd out_fd) = 0;
  virtual size_t connection_count() const = 0;
};

}  // namespace rpoint
