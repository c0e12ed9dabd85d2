#include "nbd/tls_config.h"

#include <unistd.h>

namespace rpoint::nbd {
namespace {

Status GnutlsError(int rc, const std::string& what) {
  return Status::InvalidArgument(what + ": " + gnutls_strerror(rc));
}

bool Readable(const std::string& path) {
  return ::access(path.c_str(), R_OK) == 0;
}

// NORMAL is GnuTLS's vetted default set (TLS 1.2 and 1.3). PSK key exchanges
// are off in NORMAL and are added only when a PSK file is configured, as
// nbdkit and qemu do.
constexpr const char* kPriorityX509 = "NORMAL";
constexpr const char* kPriorityPsk = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK";

}  // namespace

const char* TlsModeName(TlsMode mode) {
  switch (mode) {
    case TlsMode::kOff:
      return "off";
    case TlsMode::kAllow:
      return "allow";
    case TlsMode::kRequire:
      return "require";
  }
  return "?";
}

bool ParseTlsMode(const std::string& text, TlsMode* out) {
  if (text == "off") {
    *out = TlsMode::kOff;
  } else if (text == "allow") {
    *out = TlsMode::kAllow;
  } else if (text == "require") {
    *out = TlsMode::kRequire;
  } else {
    return false;
  }
  return true;
}

Result<std::shared_ptr<const TlsCredentials>> TlsCredentials::LoadServer(
    const TlsSettings& settings) {
  if (!settings.configured())
    return Status::InvalidArgument("TLS: neither tls.dir nor tls.psk_file is set");
  std::shared_ptr<TlsCredentials> c(new TlsCredentials());
  c->verify_peer_ = settings.verify_peer;
  int rc;
  if (!settings.dir.empty()) {
    const std::string cert = settings.dir + "/server-cert.pem";
    const std::string key = settings.dir + "/server-key.pem";
    const std::string ca = settings.dir + "/ca-cert.pem";
    const std::string crl = settings.dir + "/ca-crl.pem";
    for (const std::string& f : {cert, key}) {
      if (!Readable(f)) return Status::NotFound("TLS: cannot read " + f);
    }
    gnutls_certificate_credentials_t raw = nullptr;
    rc = gnutls_certificate_allocate_credentials(&raw);
    if (rc < 0) return GnutlsError(rc, "TLS: allocating certificate credentials");
    c->x509_.reset(raw);
    rc = gnutls_certificate_set_x509_key_file(raw, cert.c_str(), key.c_str(), GNUTLS_X509_FMT_PEM);
    if (rc < 0) return GnutlsError(rc, "TLS: loading " + cert + " with " + key);
    if (Readable(ca)) {
      rc = gnutls_certificate_set_x509_trust_file(raw, ca.c_str(), GNUTLS_X509_FMT_PEM);
      if (rc < 0) return GnutlsError(rc, "TLS: loading " + ca);
      if (rc == 0) return Status::InvalidArgument("TLS: " + ca + " holds no certificate");
    } else if (settings.verify_peer) {
      return Status::NotFound(
          "TLS: tls.verify_peer needs the CA that signs client certificates: cannot read " + ca);
    }
    if (Readable(crl)) {
      rc = gnutls_certificate_set_x509_crl_file(raw, crl.c_str(), GNUTLS_X509_FMT_PEM);
      if (rc < 0) return GnutlsError(rc, "TLS: loading " + crl);
    }
    // For DHE key exchanges of TLS 1.2 clients.
    rc = gnutls_certificate_set_known_dh_params(raw, GNUTLS_SEC_PARAM_MEDIUM);
    if (rc < 0) return GnutlsError(rc, "TLS: DH parameters");
  }
  if (!settings.psk_file.empty()) {
    if (!Readable(settings.psk_file)) {
      return Status::NotFound("TLS: cannot read " + settings.psk_file);
    }
    gnutls_psk_server_credentials_t raw = nullptr;
    rc = gnutls_psk_allocate_server_credentials(&raw);
    if (rc < 0) return GnutlsError(rc, "TLS: allocating PSK credentials");
    c->psk_.reset(raw);
    // GnuTLS reads the psktool format itself, at each handshake (so keys can
    // be added or revoked without a restart).
    rc = gnutls_psk_set_server_credentials_file(raw, settings.psk_file.c_str());
    if (rc < 0) return GnutlsError(rc, "TLS: loading " + settings.psk_file);
    rc = gnutls_psk_set_server_known_dh_params(raw, GNUTLS_SEC_PARAM_MEDIUM);
    if (rc < 0) return GnutlsError(rc, "TLS: DH parameters");
  }
  gnutls_priority_t prio = nullptr;
  rc = gnutls_priority_init(&prio, c->psk_ ? kPriorityPsk : kPriorityX509, nullptr);
  if (rc < 0) return GnutlsError(rc, "TLS: priority string");
  c->priority_.reset(prio);
  return std::shared_ptr<const TlsCredentials>(std::move(c));
}

Status TlsCredentials::Apply(gnutls_session_t session) const {
  int rc = gnutls_priority_set(session, priority_.get());
  if (rc < 0) return GnutlsError(rc, "TLS: setting priorities");
  if (x509_) {
    rc = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, x509_.get());
    if (rc < 0) return GnutlsError(rc, "TLS: setting certificate credentials");
    if (verify_peer_) {
      // The handshake fails unless the client presents a certificate that
      // chains to ca-cert.pem (no host name to check: clients are not hosts
      // we named).
      gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE);
      gnutls_session_set_verify_cert(session, nullptr, 0);
    }
  }
  if (psk_) {
    rc = gnutls_credentials_set(session, GNUTLS_CRD_PSK, psk_.get());
    if (rc < 0) return GnutlsError(rc, "TLS: setting PSK credentials");
  }
  return Status::Ok();
}

}  // namespace rpoint::nbd
