// The peer API's routes (docs/api.md, "Peer API"): what other rpointd hosts
// call, over HTTPS with mutual TLS (control/peer_server.h), to keep
// collections and restore points in this host's regions. Thin translations to
// RestoreService's peer calls; the JSON bodies are restore/peer_link.h's.
//
// Thread-safety: handlers run on the peer server's connection threads.
#pragma once

#include "control/router.h"
#include "restore/restore_service.h"

namespace rpoint {

void AddPeerRoutes(Router& router, RestoreService& restore);

}  // namespace rpoint
