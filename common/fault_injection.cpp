#include "common/fault_injection.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

namespace rpoint::fault {
namespace {

struct Table {
  std::mutex mu;
  std::vector<Rule> rules;
  std::map<std::string, uint64_t> hits;  // per point name
  uint64_t generation = 0;               // bumped by Arm: ends every delay
  std::condition_variable changed;
};

Table& table() {
  static Table* t = new Table();  // never destroyed: hooks may run during exit
  return *t;
}

struct ErrnoName {
  const char* name;
  int value;
};
constexpr ErrnoName kErrnos[] = {{"EIO", EIO},     {"ENOSPC", ENOSPC}, {"EDQUOT", EDQUOT},
                                 {"EROFS", EROFS}, {"EBADF", EBADF},   {"EACCES", EACCES},
                                 {"EPERM", EPERM}, {"EINTR", EINTR},   {"ENOMEM", ENOMEM}};

bool Matches(const std::string& pattern, const char* point) {
  if (!pattern.empty() && pattern.back() == '*') {
    return std::strncmp(point, pattern.data(), pattern.size() - 1) == 0;
  }
  return pattern == point;
}

bool KnownPattern(const std::string& pattern) {
  for (const char* p : kFaultPoints) {
    if (Matches(pattern, p)) return true;
  }
  return false;
}

// Parses a decimal count >= 1.
bool ParseCount(const std::string& s, uint64_t* out) {
  if (s.empty() || s.size() > 18) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + uint64_t(c - '0');
  }
  if (v == 0) return false;
  *out = v;
  return true;
}

Result<Rule> ParseRule(const std::string& text) {
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument("fault rule '" + text + "': " + why);
  };
  size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) return bad("expected point=ACTION[@N][*K]");
  Rule r;
  r.pattern = text.substr(0, eq);
  if (!KnownPattern(r.pattern)) return bad("no such fault point (see docs/testing.md)");
  std::string rest = text.substr(eq + 1);
  size_t star = rest.find('*');
  if (star != std::string::npos) {
    if (!ParseCount(rest.substr(star + 1), &r.count)) return bad("*K needs a count >= 1");
    rest.resize(star);
  }
  size_t at = rest.find('@');
  if (at != std::string::npos) {
    if (!ParseCount(rest.substr(at + 1), &r.from_hit)) return bad("@N needs a hit number >= 1");
    rest.resize(at);
  }
  if (rest.rfind("delay", 0) == 0) {
    uint64_t ms = 0;
    if (!ParseCount(rest.substr(5), &ms) || ms > 600000) return bad("delay<MS> needs 1..600000 ms");
    r.action.delay_ms = unsigned(ms);
    return r;
  }
  if (rest == "short") {
    r.action.shorten = true;
    return r;
  }
  for (const auto& e : kErrnos) {
    if (rest == e.name) {
      r.action.error = e.value;
      return r;
    }
  }
  uint64_t n = 0;
  if (ParseCount(rest, &n) && n < 4096) {
    r.action.error = int(n);
    return r;
  }
  return bad("action must be short, an errno name (EIO, ENOSPC, ...) or number");
}

std::string ActionText(const Action& a) {
  if (a.shorten) return "short";
  if (a.delay_ms) return "delay" + std::to_string(a.delay_ms);
  for (const auto& e : kErrnos) {
    if (e.value == a.error) return e.name;
  }
  return std::to_string(a.error);
}

// Applies a fault that is not a write: `short` means EIO there.
int ErrorOf(const Action& a) {
  return a.error ? a.error : (a.shorten ? EIO : 0);
}

}  // namespace

Result<std::vector<Rule>> ParseRules(const std::string& text) {
  std::vector<Rule> out;
  std::string cur;
  auto flush = [&]() -> Status {
    if (cur.empty()) return Status::Ok();
    auto r = ParseRule(cur);
    cur.clear();
    if (!r.ok()) return r.status();
    out.push_back(std::move(r).value());
    return Status::Ok();
  };
  for (char c : text) {
    if (c == ',' || c == ';' || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      Status s = flush();
      if (!s.ok()) return s;
    } else {
      cur.push_back(c);
    }
  }
  Status s = flush();
  if (!s.ok()) return s;
  return out;
}

void Arm(std::vector<Rule> rules) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.rules = std::move(rules);
  t.hits.clear();
  ++t.generation;
  t.changed.notify_all();
  internal::g_armed.store(!t.rules.empty(), std::memory_order_relaxed);
}

void DisarmAll() {
  Arm({});
}

std::string Describe() {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  if (t.rules.empty()) return "none";
  std::string out;
  for (const Rule& r : t.rules) {
    if (!out.empty()) out += ",";
    out += r.pattern + "=" + ActionText(r.action);
    if (r.from_hit != 1) out += "@" + std::to_string(r.from_hit);
    if (r.count != 0) out += "*" + std::to_string(r.count);
  }
  return out;
}

Status ArmFromEnvironment() {
  const char* env = std::getenv("RPOINTD_FAULTS");
  if (!env) return Status::Ok();
  auto rules = ParseRules(env);
  if (!rules.ok()) return Status::InvalidArgument("RPOINTD_FAULTS: " + rules.status().message());
  Arm(std::move(rules).value());
  return Status::Ok();
}

Status ReloadFromFile() {
  const char* path = std::getenv("RPOINTD_FAULTS_FILE");
  if (!path || !*path) return Status::Ok();
  std::ifstream f(path);
  std::string text;
  if (f) {
    std::ostringstream ss;
    ss << f.rdbuf();
    text = ss.str();
  }
  auto rules = ParseRules(text);
  if (!rules.ok()) {
    return Status::InvalidArgument(std::string("RPOINTD_FAULTS_FILE ") + path + ": " +
                                   rules.status().message());
  }
  Arm(std::move(rules).value());
  return Status::Ok();
}

Action internal::HitSlow(const char* point) {
  Action a;
  Table& t = table();
  std::unique_lock<std::mutex> lock(t.mu);
  uint64_t n = ++t.hits[point];
  for (const Rule& r : t.rules) {
    if (!Matches(r.pattern, point)) continue;
    if (n >= r.from_hit && (r.count == 0 || n < r.from_hit + r.count)) a = r.action;
    break;
  }
  if (a.delay_ms) {
    // Until the time is up or the rules change: a test holds a step with a
    // long delay and lets it go by arming its next rules.
    const uint64_t gen = t.generation;
    t.changed.wait_for(lock, std::chrono::milliseconds(a.delay_ms),
                       [&] { return t.generation != gen; });
  }
  return a;
}

ssize_t WriteLength(const char* point, size_t len) {
  Action a = Hit(point);
  if (a.error) return -a.error;
  if (a.shorten && len > 1) return ssize_t(len / 2);
  return ssize_t(len);
}

uint64_t Hits(const char* point) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.hits.find(point);
  return it == t.hits.end() ? 0 : it->second;
}

ssize_t Pread(const char* point, int fd, void* buf, size_t len, off_t off) {
  ssize_t n = WriteLength(point, len);
  if (n < 0) {
    errno = int(-n);
    return -1;
  }
  return ::pread(fd, buf, size_t(n), off);
}

ssize_t Pwrite(const char* point, int fd, const void* buf, size_t len, off_t off) {
  ssize_t n = WriteLength(point, len);
  if (n < 0) {
    errno = int(-n);
    return -1;
  }
  return ::pwrite(fd, buf, size_t(n), off);
}

ssize_t Write(const char* point, int fd, const void* buf, size_t len) {
  ssize_t n = WriteLength(point, len);
  if (n < 0) {
    errno = int(-n);
    return -1;
  }
  return ::write(fd, buf, size_t(n));
}

int Fdatasync(const char* point, int fd) {
  if (int e = ErrorOf(Hit(point))) {
    errno = e;
    return -1;
  }
  return ::fdatasync(fd);
}

int Open(const char* point, const char* path, int flags, mode_t mode) {
  if (int e = ErrorOf(Hit(point))) {
    errno = e;
    return -1;
  }
  return ::open(path, flags, mode);
}

int Fsync(const char* point, int fd) {
  if (int e = ErrorOf(Hit(point))) {
    errno = e;
    return -1;
  }
  return ::fsync(fd);
}

int Rename(const char* point, const char* from, const char* to) {
  if (int e = ErrorOf(Hit(point))) {
    errno = e;
    return -1;
  }
  return ::rename(from, to);
}

}  // namespace rpoint::fault
