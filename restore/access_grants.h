// AccessGrants: time-limited read access to one disk restore point over NBD,
// as Azure's beginGetAccess/endGetAccess hand out a SAS URL.
//
// A grant is a 256-bit token from OpenSSL's CSPRNG (RAND_bytes), written as 64
// lowercase hex characters. The token is the NBD export name of the grant:
// `nbd://host:port/TOKEN` (`nbds://` when the TCP listener speaks TLS) or
// `nbd+unix:///TOKEN?socket=PATH`; it works on every NBD listener, the
// listener only picks which URI is handed out. Disk names are at most 63
// characters, so no disk or point export can look like a token.
//
// Secrecy: the token is kept in this process's memory only. metadata.db holds
// its SHA-256 (table access_grants) with the disk restore point and the expiry,
// so grants survive a restart while nothing on disk can be replayed. Lookups
// hash the name asked for and compare it with every grant's hash in constant
// time (CRYPTO_memcmp). The token is never listed (NBD_OPT_LIST), logged, put
// in an error message or shown by a GET other than the operation that created
// it (served from memory while the grant is active and its token known).
//
// A grant offers its point export's NBD meta contexts (rpoint:changed:
// {collection}/{point}, restore/point_exports.cpp): a peer copy asks for its
// base's. They show which blocks differ from another point of the same disk
// in the region, never that point's data.
//
// One grant per disk restore point. beginGetAccess again while it is active
// returns the same token with the later of the two expiries; after a restart
// the daemon no longer knows the token, so a repeat is refused (Conflict) until
// endGetAccess or expiry. Revocation (endGetAccess, expiry, the point deleted)
// retires the grant's devices: connections stop reading requests at once, reads
// still running answer an error instead of data, and the NBD server closes
// idle connections within ~200 ms. Wrong token-shaped names are refused at the
// handshake, each after a delay that doubles with every failure (global
// counter; 100 ms up to 5 s, forgotten after 10 s without one); the wait is on
// the handshake's own thread, never a reactor.
//
// Thread-safety: every method is safe from any thread. A sweeper thread ends
// expired grants and those whose point is gone.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "common/status.h"
#include "engine/block_device.h"
#include "restore/restore_service.h"

namespace rpoint {

struct AccessGrantOptions {
  std::string metadata_db;
  // "host:port" as clients reach the TCP listener ("[::1]:10809"); empty: none.
  std::string tcp_address;
  bool tcp_tls = false;                  // the TCP listener speaks TLS: nbds:// URIs
  bool unix_tls = false;                 // the Unix listener speaks TLS: nbds+unix:// URIs
  std::string unix_socket;               // the NBD Unix socket; empty: none
  std::string default_listener = "tcp";  // "tcp" | "unix": when a request names none
  uint64_t max_duration_seconds = 7 * 86400;
};

// An active grant as a client sees it.
struct AccessGrant {
  std::string collection, restore_point, disk;
  std::string expiry_time;  // RFC 3339 UTC
  std::string access_sas;   // the URI; empty where the token is not to be shown
};

class AccessGrants {
 public:
  static Result<std::unique_ptr<AccessGrants>> Open(const AccessGrantOptions& options,
                                                    RestoreService& restore);
  virtual ~AccessGrants() = default;

  // True for names shaped like a token (64 of [0-9a-f]): the NBD server asks
  // this service, not the disks or points, about them.
  static bool IsTokenName(const std::string& name);

  // beginGetAccess. access must be "Read"; 1 <= duration <= max; listener
  // "tcp", "unix" or empty (the default). Returns the grant with its URI and
  // the id of the (already Succeeded) operation that carries it.
  // InvalidArgument: bad access, duration or listener; NotFound: no such disk
  // restore point; Conflict: the point has not succeeded, or an active grant's
  // token is not known any more (the daemon restarted since it was made).
  virtual Result<Started<AccessGrant>> begin_get_access(
      const std::string& collection, const std::string& restore_point, const std::string& disk,
      const std::string& access, uint64_t duration_seconds, const std::string& listener) = 0;
  // endGetAccess: revokes the grant, if any, and cuts its connections.
  // Returns whether there was one. NotFound: no such disk restore point.
  virtual Result<bool> end_get_access(const std::string& collection,
                                      const std::string& restore_point,
                                      const std::string& disk) = 0;
  // A BeginGetAccess operation (with its accessSAS while the grant is active);
  // nullopt for ids this service does not know.
  virtual std::optional<OperationRecord> get_operation(const std::string& id) = 0;

  // Token names: find_export answers the grant's read-only device; refuse
  // counts a failure and says how long to wait.
  virtual ExportResolver& exports() = 0;

  // Stops the sweeper. Idempotent.
  virtual void shutdown() = 0;
};

}  // namespace rpoint
