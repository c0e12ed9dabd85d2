#include "restore/nbd_source.h"

#include <libnbd.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
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

NbdSource::NbdSource(std::string uri, std::string tls_dir, unsigned deadline_seconds,
                     std::string meta_context)
    : uri_(std::move(uri)),
      tls_dir_(std::move(tls_dir)),
      meta_context_(std::move(meta_context)),
      deadline_(deadline_seconds) {}

NbdSource::~NbdSource() {
  close();
}

void NbdSource::close() {
  if (h_) nbd_close(h_);
  h_ = nullptr;
}

Status NbdSource::connect() {
  close();
  if (uri_source_) {
    std::string u = uri_source_();
    if (!u.empty() && u != uri_) {
      uri_ = std::move(u);
      uri_changed_ = true;
    }
  }
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
  if (!meta_context_.empty() && nbd_add_meta_context(h_, meta_context_.c_str()) == -1) {
    return fail("asking for a meta context of");
  }
  if (nbd_connect_uri(h_, uri_.c_str()) == -1) return fail("connecting to");
  return Status::Ok();
}

// One command, polled so that a link that stalls (TCP retransmitting into a
// cut) fails it after the deadline instead of blocking for TCP's minutes.
Status NbdSource::wait(int64_t cookie, const std::string& what, const std::function<bool()>& stop) {
  if (cookie == -1) return Status::IoError(what + ": " + nbd_get_error());
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    int r = nbd_aio_command_completed(h_, static_cast<uint64_t>(cookie));
    if (r == 1) return Status::Ok();
    if (r == -1) return Status::IoError(what + ": " + nbd_get_error());
    if (stop()) return Status::Shutdown("daemon stopping");
    if (std::chrono::steady_clock::now() - start > deadline_) {
      return Status::IoError(what + ": no answer for " + std::to_string(deadline_.count()) + " s");
    }
    if (nbd_poll(h_, 500) == -1) return Status::IoError(what + ": " + nbd_get_error());
  }
}

Status NbdSource::pread(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop) {
  std::string what = "reading " + std::to_string(len) + " bytes at " + std::to_string(offset) +
                     " from " + Redacted(uri_);
  return wait(nbd_aio_pread(h_, buf, len, offset, NBD_NULL_COMPLETION, 0), what, stop);
}

namespace {

struct ExtentSink {
  const std::string* context;
  std::vector<std::pair<uint64_t, uint64_t>>* out;
  uint64_t end;  // where the extents answered so far end
};

int OnExtents(void* user, const char* metacontext, uint64_t offset, uint32_t* entries,
              size_t nr_entries, int*) {
  auto* sink = static_cast<ExtentSink*>(user);
  if (*sink->context != metacontext) return 0;
  for (size_t i = 0; i + 1 < nr_entries; i += 2) {
    const uint64_t len = entries[i];
    if (entries[i + 1] & 1) {
      auto& out = *sink->out;
      if (!out.empty() && out.back().first + out.back().second == offset) {
        out.back().second += len;
      } else {
        out.emplace_back(offset, len);
      }
    }
    offset += len;
  }
  sink->end = std::max(sink->end, offset);
  return 0;
}

}  // namespace

Status NbdSource::block_status(uint64_t size, std::vector<std::pair<uint64_t, uint64_t>>* out,
                               const std::function<bool()>& stop) {
  out->clear();
  if (meta_context_.empty() || nbd_can_meta_context(h_, meta_context_.c_str()) != 1) {
    return Status::NotFound(Redacted(uri_) + " does not offer the meta context " + meta_context_);
  }
  for (uint64_t at = 0; at < size;) {
    ExtentSink sink{&meta_context_, out, at};
    const uint64_t count = std::min<uint64_t>(size - at, 1u << 30);
    std::string what = "block status of " + std::to_string(count) + " bytes at " +
                       std::to_string(at) + " from " + Redacted(uri_);
    Status s = wait(
        nbd_aio_block_status(h_, count, at, {OnExtents, &sink, nullptr}, NBD_NULL_COMPLETION, 0),
        what, stop);
    if (!s.ok()) return s;
    if (sink.end <= at) return Status::IoError(what + ": the server answered no extent");
    at = sink.end;
  }
  return Status::Ok();
}

Status NbdSource::retrying(const std::function<Status()>& op, const std::function<bool()>& stop) {
  auto last_ok = std::chrono::steady_clock::now();
  auto backoff = std::chrono::milliseconds(200);
  Status last;
  for (;;) {
    if (stop()) return Status::Shutdown("daemon stopping");
    Status s = h_ ? Status::Ok() : connect();
    if (uri_changed_) {
      uri_changed_ = false;
      last_ok = std::chrono::steady_clock::now();
    }
    if (s.ok()) {
      s = op();
      // NotFound: the context is not offered; a new connection would not change that.
      if (s.ok() || s.code() == Code::kNotFound || s.code() == Code::kShutdown) return s;
      close();
    }
    last = s;
    if (std::chrono::steady_clock::now() - last_ok > deadline_) {
      return Status::IoError(last.message() + " (gave up after " +
                             std::to_string(deadline_.count()) + " s of retries)");
    }
    spdlog::warn("peer copy: {}; retrying in {} ms", s.message(), backoff.count());
    if (nap_) {
      nap_(backoff);
    } else {
      std::this_thread::sleep_for(backoff);
    }
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(5));
    ++reconnects_;
  }
}

Status NbdSource::read(uint64_t offset, size_t len, void* buf, const std::function<bool()>& stop) {
  return retrying([&] { return pread(offset, len, buf, stop); }, stop);
}

Result<std::vector<std::pair<uint64_t, uint64_t>>> NbdSource::dirty_extents(
    uint64_t size, const std::function<bool()>& stop) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  Status s = retrying([&] { return block_status(size, &out, stop); }, stop);
  if (!s.ok()) return s;
  return out;
}

}  // namespace rpoint
