#include "nbd/tls_session.h"

#include <gnutls/x509.h>

#include <cerrno>
#include <cstring>

namespace rpoint::nbd {
namespace {

// Room for several full TLS records (16 KiB + overhead each) per receive.
constexpr size_t kInputBuffer = 256u << 10;

struct CrtFree {
  void operator()(gnutls_x509_crt_t c) const { gnutls_x509_crt_deinit(c); }
};

}  // namespace

Result<std::unique_ptr<TlsSession>> TlsSession::CreateServer(
    std::shared_ptr<const TlsCredentials> creds) {
  if (!creds) return Status::Internal("TLS: no credentials");
  gnutls_session_t raw = nullptr;
  int rc = gnutls_init(&raw, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
  if (rc < 0) return Status::Internal(std::string("TLS: gnutls_init: ") + gnutls_strerror(rc));
  std::unique_ptr<TlsSession> t(new TlsSession(raw));
  Status s = creds->Apply(raw);
  t->creds_ = std::move(creds);
  if (!s.ok()) return s;
  gnutls_transport_set_ptr(raw, t.get());
  gnutls_transport_set_push_function(raw, &TlsSession::Push);
  gnutls_transport_set_pull_function(raw, &TlsSession::Pull);
  gnutls_transport_set_pull_timeout_function(raw, &TlsSession::PullTimeout);
  // The handshake's caller enforces the NBD handshake deadline.
  gnutls_handshake_set_timeout(raw, 0);
  return t;
}

TlsSession::TlsSession(gnutls_session_t s) : session_(s), in_(kInputBuffer) {}
TlsSession::~TlsSession() = default;

ssize_t TlsSession::Push(gnutls_transport_ptr_t self, const void* data, size_t n) {
  auto* t = static_cast<TlsSession*>(self);
  const char* p = static_cast<const char*>(data);
  t->stage_.insert(t->stage_.end(), p, p + n);
  return static_cast<ssize_t>(n);
}

ssize_t TlsSession::Pull(gnutls_transport_ptr_t self, void* data, size_t n) {
  auto* t = static_cast<TlsSession*>(self);
  size_t avail = t->in_end_ - t->in_pos_;
  if (avail == 0) {
    gnutls_transport_set_errno(t->session_.get(), EAGAIN);
    return -1;
  }
  size_t k = std::min(n, avail);
  std::memcpy(data, t->in_.data() + t->in_pos_, k);
  t->in_pos_ += k;
  if (t->in_pos_ == t->in_end_) t->in_pos_ = t->in_end_ = 0;
  return static_cast<ssize_t>(k);
}

int TlsSession::PullTimeout(gnutls_transport_ptr_t self, unsigned) {
  auto* t = static_cast<TlsSession*>(self);
  return t->in_pos_ < t->in_end_ ? 1 : 0;
}

TlsSession::Progress TlsSession::handshake() {
  for (;;) {
    int rc = gnutls_handshake(session_.get());
    if (rc == GNUTLS_E_SUCCESS) return Progress::kDone;
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
      if (has_input()) continue;
      return Progress::kWantInput;
    }
    if (!gnutls_error_is_fatal(rc)) continue;  // a warning alert: go on
    error_ = std::string("TLS handshake failed: ") + gnutls_strerror(rc);
    if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
      gnutls_certificate_status_t st = static_cast<gnutls_certificate_status_t>(
          gnutls_session_get_verify_cert_status(session_.get()));
      gnutls_datum_t out{};
      if (gnutls_certificate_verification_status_print(st, GNUTLS_CRT_X509, &out, 0) == 0) {
        error_ += std::string(" (") + reinterpret_cast<const char*>(out.data) + ")";
        gnutls_free(out.data);
      }
    }
    (void)gnutls_alert_send_appropriate(session_.get(), rc);
    return Progress::kFailed;
  }
}

ssize_t TlsSession::recv(void* buf, size_t n) {
  for (;;) {
    ssize_t r = gnutls_record_recv(session_.get(), buf, n);
    if (r >= 0) return r;
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
      if (has_input()) continue;
      return kAgain;
    }
    if (r == GNUTLS_E_REHANDSHAKE) {
      // TLS 1.2 renegotiation is not offered: say no and carry on.
      (void)gnutls_alert_send(session_.get(), GNUTLS_AL_WARNING, GNUTLS_A_NO_RENEGOTIATION);
      continue;
    }
    if (!gnutls_error_is_fatal(static_cast<int>(r))) continue;
    error_ = std::string("TLS receive: ") + gnutls_strerror(static_cast<int>(r));
    return kError;
  }
}

Status TlsSession::send(const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t w = gnutls_record_send(session_.get(), p, n);
    if (w == GNUTLS_E_AGAIN || w == GNUTLS_E_INTERRUPTED) continue;  // push never blocks
    if (w < 0) {
      error_ = std::string("TLS send: ") + gnutls_strerror(static_cast<int>(w));
      return Status::IoError(error_);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

void TlsSession::close_notify() {
  (void)gnutls_bye(session_.get(), GNUTLS_SHUT_WR);
}

bool TlsSession::has_buffered_plaintext() const {
  return gnutls_record_check_pending(session_.get()) > 0;
}

char* TlsSession::input_space(size_t* len) {
  if (in_pos_ > 0) {
    std::memmove(in_.data(), in_.data() + in_pos_, in_end_ - in_pos_);
    in_end_ -= in_pos_;
    in_pos_ = 0;
  }
  *len = in_.size() - in_end_;
  return in_.data() + in_end_;
}

void TlsSession::commit_input(size_t n) {
  in_end_ += n;
}

bool TlsSession::start_flight() {
  if (flight_pos_ < flight_.size() || stage_.empty()) return false;
  flight_.swap(stage_);
  stage_.clear();
  flight_pos_ = 0;
  return true;
}

void TlsSession::flight_done(size_t n) {
  flight_pos_ += n;
  if (flight_pos_ >= flight_.size()) {
    flight_.clear();
    flight_pos_ = 0;
  }
}

std::string TlsSession::describe() const {
  gnutls_session_t s = session_.get();
  std::string out = gnutls_protocol_get_name(gnutls_protocol_get_version(s));
  const char* psk_user = gnutls_psk_server_get_username(s);
  if (psk_user && *psk_user) {
    return out + " psk '" + psk_user + "'";
  }
  unsigned n = 0;
  const gnutls_datum_t* certs = gnutls_certificate_get_peers(s, &n);
  if (!certs || n == 0) return out + " x509 (no client certificate)";
  gnutls_x509_crt_t raw = nullptr;
  if (gnutls_x509_crt_init(&raw) < 0) return out + " x509";
  std::unique_ptr<std::remove_pointer_t<gnutls_x509_crt_t>, CrtFree> crt(raw);
  gnutls_datum_t dn{};
  if (gnutls_x509_crt_import(raw, &certs[0], GNUTLS_X509_FMT_DER) < 0 ||
      gnutls_x509_crt_get_dn3(raw, &dn, 0) < 0) {
    return out + " x509";
  }
  out += " x509 '" + std::string(reinterpret_cast<const char*>(dn.data), dn.size) + "'";
  gnutls_free(dn.data);
  return out;
}

}  // namespace rpoint::nbd
