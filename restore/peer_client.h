// PeerClient: the HTTPS client (Boost.Beast over Asio SSL, OpenSSL) for
// other rpointd hosts' peer API. Mutual TLS from `tls_dir`: it presents
// client-cert.pem/client-key.pem and accepts only a server whose certificate
// ca-cert.pem signed and names the host it dialled (IP or DNS SAN). One
// connection per call (calls are rare: a pull and its progress polls), each
// step bounded by `timeout_ms`, so a cut link fails a call instead of
// hanging it; callers retry.
//
// Thread-safety: call() from any thread.
#pragma once

#include <memory>
#include <string>

#include "restore/peer_link.h"

namespace rpoint {

Result<std::unique_ptr<PeerLink>> MakePeerClient(const std::string& tls_dir, unsigned timeout_ms);

}  // namespace rpoint
