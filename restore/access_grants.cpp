// AccessGrants implementation: the grant table (memory + metadata.db), the
// token exports and the sweeper. See access_grants.h for the contract.
#include "restore/access_grants.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "disks/disk_files.h"
#include "disks/metadata_db.h"
#include "engine/read_only_device.h"
#include "restore/restore_service_impl.h"

namespace rpoint {
namespace {

using Clock = std::chrono::system_clock;
using Hash = std::array<unsigned char, SHA256_DIGEST_LENGTH>;

constexpr size_t kTokenBytes = 32;  // 256 bits
constexpr size_t kTokenChars = 2 * kTokenBytes;
constexpr auto kSweepEvery = std::chrono::milliseconds(250);
constexpr int kValidateEveryTicks = 4;  // points re-checked once a second
constexpr auto kFirstFailureDelay = std::chrono::milliseconds(100);
constexpr auto kMaxFailureDelay = std::chrono::milliseconds(5000);
constexpr auto kFailureMemory = std::chrono::seconds(10);
constexpr size_t kOpsPerGrant = 16;  // operations remembered per grant (repeats)

std::string Hex(const unsigned char* p, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[p[i] >> 4];
    out[2 * i + 1] = kDigits[p[i] & 15];
  }
  return out;
}

Hash Sha256(const std::string& s) {
  Hash h{};
  SHA256(reinterpret_cast<const unsigned char*>(s.data()), s.size(), h.data());
  return h;
}

bool FromHex(const std::string& s, Hash* out) {
  if (s.size() != 2 * out->size()) return false;
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < out->size(); ++i) {
    int hi = nib(s[2 * i]), lo = nib(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    (*out)[i] = static_cast<unsigned char>(hi << 4 | lo);
  }
  return true;
}

int64_t ToMs(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

std::string Rfc3339(int64_t ms) {
  return FormatRfc3339(std::chrono::system_clock::time_point(std::chrono::milliseconds(ms)));
}

// Socket paths in a URI query: everything but unreserved characters and '/'
// percent-encoded, so a path with '&', '?' or spaces survives.
std::string QueryEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '/' || c == '-' || c == '.' || c == '_' || c == '~') {
      out += static_cast<char>(c);
    } else {
      char b[4];
      std::snprintf(b, sizeof b, "%%%02X", c);
      out += b;
    }
  }
  return out;
}

// The export behind a token: the point's device through a ReadOnlyDevice,
// with its own retired flag so revoking the grant cuts only the grant's
// clients (others reading the point by its name keep going). Named after what
// it serves, never after the token, since transports log the device's name.
using GrantDevice = ReadOnlyDevice;

struct Grant {
  std::string collection, restore_point, disk;
  std::string point_time;  // the point's timeCreated when the grant was made
  Hash hash{};
  std::string token;  // empty after a restart: only the hash is stored
  int64_t expiry_ms = 0;
  std::vector<std::weak_ptr<GrantDevice>> devices;
  std::deque<std::string> ops;

  std::string key() const { return collection + "/" + restore_point + "/" + disk; }
};

class AccessGrantsImpl final : public AccessGrants, public ExportResolver {
 public:
  AccessGrantsImpl(AccessGrantOptions options, RestoreService& restore,
                   std::unique_ptr<MetadataDb> db)
      : options_(std::move(options)), restore_(restore), db_(std::move(db)) {}
  ~AccessGrantsImpl() override { shutdown(); }

  Status load();
  void start() {
    sweeper_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "access-sweep");
      sweep_loop();
    });
  }

  Result<Started<AccessGrant>> begin_get_access(const std::string& collection,
                                                const std::string& restore_point,
                                                const std::string& disk, const std::string& access,
                                                uint64_t duration_seconds,
                                                const std::string& listener) override;
  Result<bool> end_get_access(const std::string& collection, const std::string& restore_point,
                              const std::string& disk) override;
  std::optional<OperationRecord> get_operation(const std::string& id) override;
  ExportResolver& exports() override { return *this; }
  void shutdown() override;

  // ExportResolver (token names only).
  std::shared_ptr<BlockDevice> find_export(const std::string& name) override;
  std::vector<ExportInfo> list_exports() override { return {}; }  // tokens are never listed
  Refusal refuse(const std::string& name) override;
  // The granted point export's rpoint:changed contexts (a peer copy asks for
  // its base's): which blocks differ from another point of the disk, never
  // that point's data.
  std::vector<std::string> meta_contexts(const std::string& name) override;
  std::shared_ptr<MetaContext> open_meta_context(const std::string& name,
                                                 const std::string& context) override;

 private:
  // The disk restore point, Succeeded; its point's timeCreated in *point_time.
  Status check_point(const std::string& c, const std::string& rp, const std::string& d,
                     std::string* point_time);
  std::string uri(const Grant& g, const std::string& listener) const;
  // The key ("c/rp/d") of the active grant whose token is `name`; empty: none.
  std::string active_key(const std::string& name, std::string* point_time);
  OperationRecord operation(const std::string& id, const Grant& g) const;
  // mu_ held: ends the grant (devices retired, operations forgotten, row deleted).
  void remove_locked(std::map<std::string, Grant>::iterator it, const char* why);
  Status save_locked(const Grant& g);
  void sweep_loop();
  void sweep(bool validate);

  const AccessGrantOptions options_;
  RestoreService& restore_;

  std::mutex mu_;
  std::unique_ptr<MetadataDb> db_;
  std::map<std::string, Grant> grants_;             // by "c/rp/d"
  std::map<std::string, std::string> ops_;          // operation id -> grant key
  std::map<std::string, std::string> op_listener_;  // operation id -> listener it asked for
  std::map<std::string, std::string> op_start_;     // operation id -> start time
  int failures_ = 0;
  std::chrono::steady_clock::time_point last_failure_{};

  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread sweeper_;
};

Status AccessGrantsImpl::load() {
  auto st = db_->db().prepare(
      "SELECT token_sha256, collection, restore_point, disk, point_time, expiry_ms "
      "FROM access_grants");
  if (!st.ok()) return st.status();
  const int64_t now = ToMs(Clock::now());
  std::vector<std::string> stale;
  for (;;) {
    auto row = st->step();
    if (!row.ok()) return row.status();
    if (!row.value()) break;
    Grant g;
    std::string hex = st->column_text(0);
    g.collection = st->column_text(1);
    g.restore_point = st->column_text(2);
    g.disk = st->column_text(3);
    g.point_time = st->column_text(4);
    g.expiry_ms = st->column_int(5);
    if (!FromHex(hex, &g.hash) || g.expiry_ms <= now) {
      stale.push_back(hex);
      continue;
    }
    grants_[g.key()] = std::move(g);
  }
  for (const std::string& hex : stale) {
    auto del = db_->db().prepare("DELETE FROM access_grants WHERE token_sha256 = ?1");
    if (!del.ok()) return del.status();
    if (Status s = del->bind(1, hex).run(); !s.ok()) return s;
  }
  if (!grants_.empty() || !stale.empty()) {
    spdlog::info("access grants: {} active, {} expired while stopped", grants_.size(),
                 stale.size());
  }
  return Status::Ok();
}

Status AccessGrantsImpl::check_point(const std::string& c, const std::string& rp,
                                     const std::string& d, std::string* point_time) {
  auto p = restore_.get_restore_point(c, rp);
  if (!p.ok()) return p.status();
  for (const auto& drp : p->disk_restore_points) {
    if (drp.disk != d) continue;
    if (p->provisioning_state != "Succeeded" || drp.status != "Succeeded") {
      return Status::Conflict("restore point '" + c + "/" + rp + "' is " + p->provisioning_state +
                              ": access is granted only to a point that has succeeded");
    }
    *point_time = p->time_created;
    return Status::Ok();
  }
  return Status::NotFound("restore point '" + c + "/" + rp + "' has no disk restore point '" + d +
                          "'");
}

std::string AccessGrantsImpl::uri(const Grant& g, const std::string& listener) const {
  if (listener == "unix") {
    return std::string(options_.unix_tls ? "nbds+unix" : "nbd+unix") + ":///" + g.token +
           "?socket=" + QueryEncode(options_.unix_socket);
  }
  return std::string(options_.tcp_tls ? "nbds" : "nbd") + "://" + options_.tcp_address + "/" +
         g.token;
}

OperationRecord AccessGrantsImpl::operation(const std::string& id, const Grant& g) const {
  OperationRecord op;
  op.id = id;
  op.kind = "BeginGetAccess";
  op.resource_id = DiskPointId(g.collection, g.restore_point, g.disk);
  op.status = "Succeeded";
  op.percent_complete = 100;
  auto st = op_start_.find(id);
  op.start_time = op.end_time = st != op_start_.end() ? st->second : "";
  auto l = op_listener_.find(id);
  op.result = {{"accessSAS", uri(g, l != op_listener_.end() ? l->second : "tcp")},
               {"expiryTime", Rfc3339(g.expiry_ms)}};
  return op;
}

Status AccessGrantsImpl::save_locked(const Grant& g) {
  // REPLACE also drops an older row of the same disk restore point (UNIQUE).
  auto st = db_->db().prepare(
      "INSERT OR REPLACE INTO access_grants "
      "(token_sha256, collection, restore_point, disk, point_time, expiry_ms) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
  if (!st.ok()) return st.status();
  return st->bind(1, Hex(g.hash.data(), g.hash.size()))
      .bind(2, g.collection)
      .bind(3, g.restore_point)
      .bind(4, g.disk)
      .bind(5, g.point_time)
      .bind(6, g.expiry_ms)
      .run();
}

void AccessGrantsImpl::remove_locked(std::map<std::string, Grant>::iterator it, const char* why) {
  Grant& g = it->second;
  for (auto& w : g.devices) {
    if (auto d = w.lock()) d->retire();  // the NBD server cuts its clients
  }
  for (const auto& id : g.ops) {
    ops_.erase(id);
    op_listener_.erase(id);
    op_start_.erase(id);
  }
  auto st = db_->db().prepare("DELETE FROM access_grants WHERE token_sha256 = ?1");
  Status s = st.ok() ? st->bind(1, Hex(g.hash.data(), g.hash.size())).run() : st.status();
  if (!s.ok()) {
    // In memory the grant is gone now; at the next start the row is dropped
    // as expired, or as naming a point that is gone (point_time).
    spdlog::error("access grant for {}: removing its record: {}", g.key(), s.ToString());
  }
  spdlog::info("access grant for {} ended: {}", g.key(), why);
  grants_.erase(it);
}

Result<Started<AccessGrant>> AccessGrantsImpl::begin_get_access(
    const std::string& c, const std::string& rp, const std::string& d, const std::string& access,
    uint64_t duration_seconds, const std::string& listener_in) {
  if (access != "Read") {
    return Status::InvalidArgument(
        "access must be 'Read' (a disk restore point is read-only), got '" + access + "'");
  }
  if (duration_seconds < 1 || duration_seconds > options_.max_duration_seconds) {
    return Status::InvalidArgument("durationInSeconds must be from 1 to " +
                                   std::to_string(options_.max_duration_seconds) + ", got " +
                                   std::to_string(duration_seconds));
  }
  const std::string listener = listener_in.empty() ? options_.default_listener : listener_in;
  if (listener != "tcp" && listener != "unix") {
    return Status::InvalidArgument("listener must be 'tcp' or 'unix', got '" + listener + "'");
  }
  if (listener == "tcp" && options_.tcp_address.empty()) {
    return Status::InvalidArgument(
        "listener 'tcp': the daemon has no NBD TCP listener (configuration nbd.tcp)");
  }
  if (listener == "unix" && options_.unix_socket.empty()) {
    return Status::InvalidArgument("listener 'unix': the daemon has no NBD Unix socket");
  }
  std::string point_time;
  if (Status s = check_point(c, rp, d, &point_time); !s.ok()) return s;

  std::lock_guard<std::mutex> lock(mu_);
  const std::string key = c + "/" + rp + "/" + d;
  const int64_t now = ToMs(Clock::now());
  const int64_t expiry = now + static_cast<int64_t>(duration_seconds) * 1000;
  auto it = grants_.find(key);
  if (it != grants_.end() && (it->second.expiry_ms <= now || it->second.point_time != point_time)) {
    // Expired and not swept yet, or made for an earlier point of this name.
    remove_locked(it, it->second.expiry_ms <= now ? "expired" : "its restore point is gone");
    it = grants_.end();
  }
  bool created = false;
  if (it != grants_.end()) {
    Grant& g = it->second;
    if (g.token.empty()) {
      return Status::Conflict("an access grant to '" + key + "' is active until " +
                              Rfc3339(g.expiry_ms) +
                              "; its URI is shown only to the call that made it and the daemon "
                              "restarted since: use that URI, or endGetAccess and then "
                              "beginGetAccess for a new one");
    }
    if (expiry > g.expiry_ms) {
      Grant updated = g;
      updated.expiry_ms = expiry;
      if (Status s = save_locked(updated); !s.ok()) return s;
      g.expiry_ms = expiry;
    }
  } else {
    Grant g;
    g.collection = c;
    g.restore_point = rp;
    g.disk = d;
    g.point_time = point_time;
    g.expiry_ms = expiry;
    unsigned char raw[kTokenBytes];
    if (RAND_bytes(raw, sizeof raw) != 1) {
      return Status::Internal("the system random generator failed (RAND_bytes)");
    }
    g.token = Hex(raw, sizeof raw);
    OPENSSL_cleanse(raw, sizeof raw);
    g.hash = Sha256(g.token);
    if (Status s = save_locked(g); !s.ok()) return s;
    it = grants_.emplace(key, std::move(g)).first;
    created = true;
    spdlog::info("access grant for {} made, until {}", key, Rfc3339(expiry));
  }
  Grant& g = it->second;
  std::string id = NewOperationId();
  ops_[id] = key;
  op_listener_[id] = listener;
  op_start_[id] = NowRfc3339();
  g.ops.push_back(id);
  while (g.ops.size() > kOpsPerGrant) {
    ops_.erase(g.ops.front());
    op_listener_.erase(g.ops.front());
    op_start_.erase(g.ops.front());
    g.ops.pop_front();
  }
  Started<AccessGrant> out;
  out.record = {c, rp, d, Rfc3339(g.expiry_ms), uri(g, listener)};
  out.operation_id = id;
  out.created = created;
  return out;
}

Result<bool> AccessGrantsImpl::end_get_access(const std::string& c, const std::string& rp,
                                              const std::string& d) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = grants_.find(c + "/" + rp + "/" + d);
  if (it == grants_.end()) {
    // Nothing to revoke: still say so for a point that does not exist.
    auto p = restore_.get_restore_point(c, rp);
    if (!p.ok()) return p.status();
    for (const auto& drp : p->disk_restore_points) {
      if (drp.disk == d) return false;
    }
    return Status::NotFound("restore point '" + c + "/" + rp + "' has no disk restore point '" + d +
                            "'");
  }
  remove_locked(it, "revoked (endGetAccess)");
  return true;
}

std::optional<OperationRecord> AccessGrantsImpl::get_operation(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto op = ops_.find(id);
  if (op == ops_.end()) return std::nullopt;
  auto g = grants_.find(op->second);
  if (g == grants_.end()) return std::nullopt;
  return operation(id, g->second);
}

std::string AccessGrantsImpl::active_key(const std::string& name, std::string* point_time) {
  if (!IsTokenName(name)) return {};
  const Hash h = Sha256(name);
  std::string key;
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = ToMs(Clock::now());
  // Every grant is compared, in constant time, whatever matched before.
  for (const auto& [k, g] : grants_) {
    if (CRYPTO_memcmp(h.data(), g.hash.data(), h.size()) == 0 && g.expiry_ms > now) {
      key = k;
      if (point_time) *point_time = g.point_time;
    }
  }
  return key;
}

std::vector<std::string> AccessGrantsImpl::meta_contexts(const std::string& name) {
  std::string key = active_key(name, nullptr);
  return key.empty() ? std::vector<std::string>{} : restore_.exports().meta_contexts(key);
}

std::shared_ptr<MetaContext> AccessGrantsImpl::open_meta_context(const std::string& name,
                                                                 const std::string& context) {
  std::string key = active_key(name, nullptr);
  return key.empty() ? nullptr : restore_.exports().open_meta_context(key, context);
}

std::shared_ptr<BlockDevice> AccessGrantsImpl::find_export(const std::string& name) {
  std::string point_time;
  std::string key = active_key(name, &point_time);
  if (key.empty()) return nullptr;
  const Hash h = Sha256(name);
  std::string collection, rp, disk;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = grants_.find(key);
    if (it == grants_.end()) return nullptr;
    collection = it->second.collection;
    rp = it->second.restore_point;
    disk = it->second.disk;
  }
  std::string now_time;
  if (!check_point(collection, rp, disk, &now_time).ok() || now_time != point_time) return nullptr;
  std::shared_ptr<BlockDevice> inner = restore_.exports().find_export(key);
  if (!inner || inner->retired()) return nullptr;
  auto dev = std::make_shared<GrantDevice>(std::move(inner), "access grant to " + key);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = grants_.find(key);
  // Revoked while we looked the point up: nothing is served.
  if (it == grants_.end() || CRYPTO_memcmp(h.data(), it->second.hash.data(), h.size()) != 0) {
    return nullptr;
  }
  auto& devs = it->second.devices;
  devs.erase(std::remove_if(devs.begin(), devs.end(), [](const auto& w) { return w.expired(); }),
             devs.end());
  devs.push_back(dev);
  return dev;
}

ExportResolver::Refusal AccessGrantsImpl::refuse(const std::string& name) {
  if (!IsTokenName(name)) return ExportResolver::refuse(name);
  std::lock_guard<std::mutex> lock(mu_);
  auto now = std::chrono::steady_clock::now();
  if (now - last_failure_ > kFailureMemory) failures_ = 0;
  last_failure_ = now;
  failures_ = std::min(failures_ + 1, 30);
  auto delay = std::min<std::chrono::milliseconds>(
      kMaxFailureDelay, kFirstFailureDelay * (int64_t{1} << std::min(failures_ - 1, 10)));
  spdlog::warn(
      "nbd: refused an unknown, expired or revoked access token ({} recent failure(s); "
      "answering after {} ms)",
      failures_, delay.count());
  return {"unknown, expired or revoked access token", delay};
}

void AccessGrantsImpl::sweep_loop() {
  int tick = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, kSweepEvery, [this] { return stopping_; });
    if (stopping_) break;
    lock.unlock();
    sweep(++tick % kValidateEveryTicks == 0);
    lock.lock();
  }
}

void AccessGrantsImpl::sweep(bool validate) {
  struct Check {
    std::string key, c, rp, d, point_time;
  };
  std::vector<Check> checks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = ToMs(Clock::now());
    for (auto it = grants_.begin(); it != grants_.end();) {
      auto next = std::next(it);
      bool point_gone = false;
      for (auto& w : it->second.devices) {
        if (auto d = w.lock(); d && d->inner_retired()) point_gone = true;
      }
      if (it->second.expiry_ms <= now) {
        remove_locked(it, "expired");
      } else if (point_gone) {
        remove_locked(it, "its restore point was deleted");
      } else if (validate) {
        const Grant& g = it->second;
        checks.push_back({it->first, g.collection, g.restore_point, g.disk, g.point_time});
      }
      it = next;
    }
  }
  // Points deleted (or replaced) while no client used the grant. The lookups
  // take RestoreService's lock: not under ours.
  for (const Check& ch : checks) {
    std::string t;
    Status s = check_point(ch.c, ch.rp, ch.d, &t);
    if (s.ok() && t == ch.point_time) continue;
    if (!s.ok() && s.code() != Code::kNotFound && s.code() != Code::kConflict) {
      continue;  // the metadata could not be read now: try again later
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto it = grants_.find(ch.key);
    if (it != grants_.end() && it->second.point_time == ch.point_time) {
      remove_locked(it, "its restore point is gone");
    }
  }
}

void AccessGrantsImpl::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (sweeper_.joinable()) sweeper_.join();
}

}  // namespace

bool AccessGrants::IsTokenName(const std::string& name) {
  if (name.size() != kTokenChars) return false;
  return std::all_of(name.begin(), name.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

Result<std::unique_ptr<AccessGrants>> AccessGrants::Open(const AccessGrantOptions& options,
                                                         RestoreService& restore) {
  auto db = MetadataDb::Open(options.metadata_db);
  if (!db.ok()) return db.status();
  auto g = std::make_unique<AccessGrantsImpl>(options, restore, std::move(db).value());
  if (Status s = g->load(); !s.ok()) return s;
  g->start();
  return std::unique_ptr<AccessGrants>(std::move(g));
}

}  // namespace rpoint
