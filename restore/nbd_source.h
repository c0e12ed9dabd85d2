// NbdSource: reads a peer's disk restore point over NBD with TLS (libnbd, the
// client), for a point being received from another host. Mutual X.509 from
// `tls_dir` (libnbd's layout: ca-cert.pem, client-cert.pem, client-key.pem);
// the server must present a certificate our CA signed for the URI's host.
//
// A failed read (a cut link, the peer restarting) closes the connection and
// retries after a backoff (200 ms doubling to 5 s) until `deadline_seconds`
// pass without a successful read; then the read fails with the last error.
// What a read returns is checked by the caller against the chunk digest.
//
// Thread-safety: one thread per NbdSource.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "common/status.h"

struct nbd_handle;

namespace rpoint {

class NbdSource {
 public:
  NbdSource(std::string uri, std::string tls_dir, unsigned deadline_seconds);
  ~NbdSource();
  NbdSource(const NbdSource&) = delete;
  NbdSource& operator=(const NbdSource&) = delete;

  // Reads [offset, offset + len); `stop` is asked between retries (true:
  // Shutdown).
  Status read(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop);
  uint64_t reconnects() const { return reconnects_; }

 private:
  Status connect();
  Status pread(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop);
  void close();
  std::string uri_, tls_dir_;
  std::chrono::seconds deadline_;
  nbd_handle* h_ = nullptr;
  uint64_t reconnects_ = 0;
};

}  // namespace rpoint
