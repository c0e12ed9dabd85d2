// Fault injection: named points in the I/O of a restore point's life where a
// test can make the operation fail on purpose (EIO, ENOSPC, a short write),
// the way LevelDB's fault-injection Env lets a test fail any file operation.
//
// Every hooked I/O names its point ("pack.sync", "staging.write", ...; the
// list is kFaultPoints below and docs/testing.md) and goes through one of the
// wrappers here (Open, Pwrite, Fdatasync, Fsync, Rename) or, where the I/O is not a
// plain syscall (io_uring SQEs, SQLite's VFS), asks Hit() what to do.
//
// Rules arm points. A rule is `point=ACTION[@N][*K]`:
//   ACTION  EIO | ENOSPC | EDQUOT | EROFS | EBADF | <errno number> | short |
//           delay<MS> (the I/O waits MS milliseconds or until the rules
//           change, then proceeds: holds a step so a test can act meanwhile)
//   @N      fail from the point's N-th hit on (1-based; default 1)
//   *K      fail K hits, then let the point pass again (default: forever)
// `point` may end in '*' to match every point with that prefix ("pack.*").
// Several rules are separated by ',' ';' or whitespace; for one hit the first
// matching rule decides. `short` makes a write transfer about half its bytes
// (at least one): a real short write, which callers must retry or report.
//
// Rules come from RPOINTD_FAULTS at daemon start, and are replaced by the
// content of the file named by RPOINTD_FAULTS_FILE on each SIGHUP. Both are a
// testing aid; a production daemon runs with neither.
//
// Cost when nothing is armed: one relaxed atomic load per hooked I/O.
// Thread-safety: all functions are safe to call from any thread; the rule
// table is guarded by a mutex taken only while some rule is armed.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <string>
#include <vector>

#include "common/status.h"

namespace rpoint::fault {

// Every point the code hooks, for documentation and rule checking.
inline constexpr const char* kFaultPoints[] = {
    "staging.write",    // copy-before-write of a block into the staging file (io_uring)
    "snapshot.read",    // the copier's reads of a disk as at the cut (the disk, the staging file)
    "tracking.write",   // a change-tracking bitmap page write
    "tracking.sync",    // fdatasync of the bitmap after the page writes
    "tracking.create",  // write/fsync/rename of a new tracking generation file
    "pack.open",        // open of a pack file: its new .tmp, a sealed pack to read or index
    "pack.write",       // a pack file write (buffer flush, trailer)
    "pack.sync",        // fdatasync of a pack before it is renamed into place
    "pack.rename",      // rename of <id>.pack.tmp to <id>.pack
    "pack.dirsync",     // fsync of the pack's directory after the rename
    "catalog.write",    // SQLite write to the store catalog (store.db, its WAL)
    "catalog.sync",     // SQLite fsync of the store catalog: its commit
    "metadata.write",   // SQLite write to the control metadata (restore points, operations)
    "metadata.sync",    // SQLite fsync of the control metadata: its commit
    "copy.chunk",       // a chunk moved by a restore point copy between regions
    "cut.settle",       // a cut, after its switch is published, before each disk settles

    "peer.chunk",    // a chunk a host receiving a point from a peer reads over NBD
    "peer.changed",  // a receiving host's rpoint:changed query of an incremental copy
    "restore.fill",  // a restore's write of one piece of a disk it fills
};

// What one hit of a point must do.
struct Action {
  int error = 0;          // > 0: fail with this errno
  bool shorten = false;   // a write: transfer only part of it
  unsigned delay_ms = 0;  // wait this long first (applied inside Hit)
};

struct Rule {
  std::string pattern;  // a point name, or a prefix ending in '*'
  Action action;
  uint64_t from_hit = 1;  // first hit that fails (1-based)
  uint64_t count = 0;     // how many hits fail; 0 = all from from_hit on
};

// Parses a rule list; InvalidArgument names the bad rule. An empty or
// whitespace-only text is no rules.
Result<std::vector<Rule>> ParseRules(const std::string& text);

// Replaces the armed rules (and resets every point's hit count).
void Arm(std::vector<Rule> rules);
void DisarmAll();
// The armed rules, as text (for logs).
std::string Describe();

// Reads RPOINTD_FAULTS; InvalidArgument for a bad rule (the daemon refuses to start).
Status ArmFromEnvironment();
// Re-reads the file named by RPOINTD_FAULTS_FILE, if set (SIGHUP). A missing
// file means no rules; a bad rule keeps the armed ones and is an error.
Status ReloadFromFile();

namespace internal {
inline std::atomic<bool> g_armed{false};
Action HitSlow(const char* point);
}  // namespace internal

// The decision for one hit of `point`: nothing (the common case), an errno, or
// a short write. Counts the hit only while some rule is armed. A null point
// (an unnamed I/O) never fails.
inline Action Hit(const char* point) {
  if (!internal::g_armed.load(std::memory_order_relaxed) || !point) return {};
  return internal::HitSlow(point);
}

// The length a write (or read) of `len` bytes at `point` should transfer
// (len, or a shorter one for `short`), or -errno to fail it with.
ssize_t WriteLength(const char* point, size_t len);
// How many times `point` was hit since the rules were last armed (hits count
// only while some rule is armed): lets a test see that its fault was reached.
uint64_t Hits(const char* point);

// Syscall wrappers: the same contract as the syscall (-1 with errno set on
// failure), with the point's fault applied first. A fault on an operation
// other than a read or write that says `short` fails with EIO; a short read
// reads about half the bytes asked for, as a real short read would.
ssize_t Pread(const char* point, int fd, void* buf, size_t len, off_t off);
ssize_t Pwrite(const char* point, int fd, const void* buf, size_t len, off_t off);
ssize_t Write(const char* point, int fd, const void* buf, size_t len);
int Open(const char* point, const char* path, int flags, mode_t mode = 0);
int Fdatasync(const char* point, int fd);
int Fsync(const char* point, int fd);
int Rename(const char* point, const char* from, const char* to);

}  // namespace rpoint::fault
