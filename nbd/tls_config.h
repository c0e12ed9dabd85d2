// TLS for the NBD server: the settings (where the keys are, whether clients
// must present certificates), the per-listener policy, and the server
// credentials loaded from them once at start-up.
//
// X.509 follows the layout qemu and nbdkit use: a directory holding
// ca-cert.pem (the CA client certificates must chain to), server-cert.pem and
// server-key.pem, optionally ca-crl.pem. PSK reads a psktool(1) file
// ("identity:hexkey" lines). Either or both may be configured.
//
// Every GnuTLS handle is held by a std::unique_ptr with the matching free
// function, so nothing leaks on an error path.
//
// Thread-safety: TlsCredentials is immutable after LoadServerCredentials and
// may be shared by every handshake thread (GnuTLS credentials and priority
// caches are safe to use from several sessions at once).
#pragma once

#include <gnutls/gnutls.h>

#include <memory>
#include <string>

#include "common/status.h"

namespace rpoint::nbd {

// What a listener asks of its clients.
//  kOff: STARTTLS is refused (NBD_REP_ERR_UNSUP), plaintext only.
//  kAllow: both; a client may upgrade with NBD_OPT_STARTTLS.
//  kRequire: every option but STARTTLS and ABORT is refused with
//    NBD_REP_ERR_TLS_REQD until the client has upgraded.
enum class TlsMode { kOff, kAllow, kRequire };
const char* TlsModeName(TlsMode mode);
// "off" | "allow" | "require"; false for anything else.
bool ParseTlsMode(const std::string& text, TlsMode* out);

struct TlsSettings {
  std::string dir;       // X.509 directory; empty: no certificates
  std::string psk_file;  // psktool file; empty: no PSK
  // X.509 clients must present a certificate signed by <dir>/ca-cert.pem.
  // PSK clients prove themselves by the key and are not asked for one.
  bool verify_peer = true;
  bool configured() const { return !dir.empty() || !psk_file.empty(); }
};

struct CertCredentialsFree {
  void operator()(gnutls_certificate_credentials_t p) const {
    gnutls_certificate_free_credentials(p);
  }
};
struct PskCredentialsFree {
  void operator()(gnutls_psk_server_credentials_t p) const {
    gnutls_psk_free_server_credentials(p);
  }
};
struct PriorityFree {
  void operator()(gnutls_priority_t p) const { gnutls_priority_deinit(p); }
};
using CertCredentials =
    std::unique_ptr<std::remove_pointer_t<gnutls_certificate_credentials_t>, CertCredentialsFree>;
using PskCredentials =
    std::unique_ptr<std::remove_pointer_t<gnutls_psk_server_credentials_t>, PskCredentialsFree>;
using Priority = std::unique_ptr<std::remove_pointer_t<gnutls_priority_t>, PriorityFree>;

class TlsCredentials {
 public:
  // Loads and checks everything `settings` names; errors name the file.
  static Result<std::shared_ptr<const TlsCredentials>> LoadServer(const TlsSettings& settings);

  // Gives a fresh server session these credentials and priorities.
  Status Apply(gnutls_session_t session) const;
  bool has_x509() const { return x509_ != nullptr; }
  bool has_psk() const { return psk_ != nullptr; }

 private:
  TlsCredentials() = default;
  CertCredentials x509_;
  PskCredentials psk_;
  Priority priority_;
  bool verify_peer_ = true;
};

// What a listener offers: TLS mode and the credentials (null when off).
struct TlsPolicy {
  TlsMode mode = TlsMode::kOff;
  std::shared_ptr<const TlsCredentials> credentials;
};

}  // namespace rpoint::nbd
