// NbdSource: reads a peer's disk restore point over NBD with TLS (libnbd, the
// client), for a point being received from another host. Mutual X.509 from
// `tls_dir` (libnbd's layout: ca-cert.pem, client-cert.pem, client-key.pem);
// the server must present a certificate our CA signed for the URI's host.
//
// A failed read (a cut link, the peer restarting) closes the connection and
// retries after a backoff (200 ms doubling to 5 s) until `deadline_seconds`
// pass without a successful read; then the read fails with the last error.
// The backoff is waited through the nap (set_nap) when one is set, so that
// whoever sets `stop` can wake it at once (a canceled copy does not wait out
// up to 5 s); without one it is a plain sleep.
// What a read returns is checked by the caller against the chunk digest.
// A uri source (set_uri_source) is asked before each connection: a sending
// host that restarted shares its point again under a new token and posts it
// again, and the next reconnect uses it (a new uri restarts the deadline).
//
// With a meta context (an incremental peer copy: rpoint:changed:{c}/{rp} of
// the sending host, naming the base point the keeping host already holds a
// copy of), each connection asks for it, and dirty_extents() reads the
// extents it marks by NBD block status. The server pins both points of the
// context once a connection negotiated it; a server that no longer offers it
// (the base was deleted there) answers NotFound, never a shorter list.
//
// Thread-safety: one thread per NbdSource.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

struct nbd_handle;

namespace rpoint {

class NbdSource {
 public:
  NbdSource(std::string uri, std::string tls_dir, unsigned deadline_seconds,
            std::string meta_context = {});
  ~NbdSource();
  NbdSource(const NbdSource&) = delete;
  NbdSource& operator=(const NbdSource&) = delete;

  // Reads [offset, offset + len); `stop` is asked between retries (true:
  // Shutdown).
  Status read(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop);
  // The runs [offset, offset + length) of [0, size) that the meta context
  // marks dirty (bit 0), in order, adjacent runs merged. NotFound: the server
  // does not offer the context (or none was given).
  Result<std::vector<std::pair<uint64_t, uint64_t>>> dirty_extents(
      uint64_t size, const std::function<bool()>& stop);
  uint64_t reconnects() const { return reconnects_; }
  // The uri to connect to, asked before each connection (from this thread).
  void set_uri_source(std::function<std::string()> source) { uri_source_ = std::move(source); }
  // How to wait a retry's backoff (from this thread): it may return early,
  // `stop` is asked again after it.
  void set_nap(std::function<void(std::chrono::milliseconds)> nap) { nap_ = std::move(nap); }

 private:
  Status connect();
  // Runs `op` on a connected handle, reconnecting and retrying as read() says.
  Status retrying(const std::function<Status()>& op, const std::function<bool()>& stop);
  // Waits for command `cookie`, polled, failing after the deadline.
  Status wait(int64_t cookie, const std::string& what, const std::function<bool()>& stop);
  Status pread(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop);
  Status block_status(uint64_t size, std::vector<std::pair<uint64_t, uint64_t>>* out,
                      const std::function<bool()>& stop);
  void close();
  std::string uri_, tls_dir_, meta_context_;
  std::chrono::seconds deadline_;
  std::function<std::string()> uri_source_;
  std::function<void(std::chrono::milliseconds)> nap_;
  bool uri_changed_ = false;  // since the last connect(): the deadline starts again
  nbd_handle* h_ = nullptr;
  uint64_t reconnects_ = 0;
};

}  // namespace rpoint
