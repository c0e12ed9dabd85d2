// PeerServer: the peer API (control/peer_handlers.h) over HTTPS with mutual
// TLS on peers.listen: what other rpointd hosts call to keep regions here.
//
// Boost.Beast over Asio SSL (OpenSSL), as the peer client in restore/ is: one
// TLS stack for the HTTPS side, while NBD keeps GnuTLS (the stack nbdkit and
// qemu use, which libnbd speaks). Keys from tls.dir: server-cert.pem and
// server-key.pem are presented, and a client is served only if it presents a
// certificate ca-cert.pem signed (a client with none, or another CA's, is
// refused in the handshake and logged; it never reaches a handler).
//
// One thread accepts; each connection gets a thread (peers are few, calls
// rare); keepalive probes and TCP_USER_TIMEOUT (io_timeout_seconds) fail a
// connection whose link is gone, so a cut link frees its thread. A client
// that does not finish its TLS handshake within io_timeout_seconds is cut, and
// at max_connections a new connection evicts the oldest one still in its
// handshake (never an authenticated one): silent sockets cannot lock peers
// out. Requests are HTTP/1.1 with keep-alive.
//
// Thread-safety: add_listener/start/stop from the owning (main) thread;
// reload_tls from any.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "common/unique_fd.h"
#include "restore/restore_service.h"

namespace rpoint {

struct PeerServerOptions {
  std::string tls_dir;                // ca-cert.pem, server-cert.pem, server-key.pem
  size_t max_body_bytes = 64u << 20;  // a pull names every chunk: ~70 bytes per chunk
  unsigned io_timeout_seconds = 30;
  unsigned max_connections = 64;
};

class PeerServer {
 public:
  static Result<std::unique_ptr<PeerServer>> Create(RestoreService& restore,
                                                    PeerServerOptions options);
  virtual ~PeerServer() = default;
  // A TCP socket already bound and listening.
  virtual Status add_listener(UniqueFd listening_fd) = 0;
  virtual void start() = 0;
  // Stops accepting, drops connections and joins their threads. Idempotent.
  virtual void stop() = 0;
  // SIGHUP: reads ca-cert.pem, server-cert.pem and server-key.pem again. New
  // handshakes use them, connections made keep theirs; an error keeps the
  // credentials in use. Safe from any thread.
  virtual Status reload_tls() = 0;
};

}  // namespace rpoint
