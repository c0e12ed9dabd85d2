#include "restore/nbd_source.h"

#include <libnbd.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <thread>

namespace rpoint {

namespace {

// The URI without its token (the export name is a secret: never logged).
std::string Redacted(const std::string& uri) {
  size_t scheme = uri.find("://");
  size_t slash = uri.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  return slash == std::string::npos ? uri : uri.substr(0, slash) + "/<token>";
}

}  // namespace

NbdSource::NbdSource(std::string uri, std::string tls_dir, unsigned deadline_seconds)
    : uri_(std::move(uri)), tls_dir_(std::move(tls_dir)), deadline_(deadline_seconds) {}

NbdSource::~NbdSource() {
  close();
}

void NbdSource::close() {
  if (h_) nbd_close(h_);
  h_ = nullptr;
}

Status NbdSource::connect() {
  close();
  h_ = nbd_create();
  if (!h_) return Status::IoError(std::string("libnbd: ") + nbd_get_error());
  auto fail = [&](const char* step) {
    std::string m = std::string(step) + " " + Redacted(uri_) + ": " + nbd_get_error();
    close();
    return Status::IoError(m);
  };
  if (nbd_set_tls_certificates(h_, tls_dir_.c_str()) == -1) return fail("TLS keys for");
  if (nbd_set_tls(h_, LIBNBD_TLS_REQUIRE) == -1) return fail("TLS for");
  if (nbd_set_tls_verify_peer(h_, true) == -1) return fail("TLS verification for");
  if (nbd_connect_uri(h_, uri_.c_str()) == -1) return fail("connecting to");
  return Status::Ok();
}

// One read, polled so that a link that stalls (TCP retransmitting into a
// cut) fails it after the deadline instead of blocking for TCP's minutes.
Status NbdSource::pread(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop) {
  auto what = [&] {
    return "reading " + std::to_string(len) + " bytes at " + std::to_string(offset) + " from " +
           Redacted(uri_);
  };
  int64_t cookie = nbd_aio_pread(h_, buf, len, offset, NBD_NULL_COMPLETION, 0);
  if (cookie == -1) return Status::IoError(what() + ": " + nbd_get_error());
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    int r = nbd_aio_command_completed(h_, static_cast<uint64_t>(cookie));
    if (r == 1) return Status::Ok();
    if (r == -1) return Status::IoError(what() + ": " + nbd_get_error());
    if (stop()) return Status::Shutdown("daemon stopping");
    if (std::chrono::steady_clock::now() - start > deadline_) {
      return Status::IoError(what() + ": no answer for " + std::to_string(deadline_.count()) +
                             " s");
    }
    if (nbd_poll(h_, 500) == -1) return Status::IoError(what() + ": " + nbd_get_error());
  }
}

Status NbdSource::read(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop) {
  auto last_ok = std::chrono::steady_clock::now();
  auto backoff = std::chrono::milliseconds(200);
  Status last;
  for (;;) {
    if (stop()) return Status::Shutdown("daemon stopping");
    Status s = h_ ? Status::Ok() : connect();
    if (s.ok()) {
      s = pread(offset, len, buf, stop);
      if (s.ok()) return s;
      close();
    }
    last = s;
    if (std::chrono::steady_clock::now() - last_ok > deadline_) {
      return Status::IoError(last.message() + " (gave up after " +
                             std::to_string(deadline_.count()) + " s of retries)");
    }
    spdlog::warn("peer copy: {}; retrying in {} ms", s.message(), backoff.count());
    std::this_thread::sleep_for(backoff);
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(5));
    ++reconnects_;
  }
}

}  // namespace rpoint
