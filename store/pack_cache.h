// PackCache: a bounded LRU of open, read-only pack files, shared by every
// Store of the process (one per region) so that the bound is the daemon's.
//
// A pack reader (export, verify, restore, GC) asks for a handle; the handle is
// a shared_ptr, and the file stays open while any handle exists: a pack in use
// is never closed under its reader (nor its fd number reused while a queued
// io_uring read names it). The cache itself keeps up to `capacity` packs open
// that nobody holds, most recently used first; beyond that, the least recently
// used unheld pack is closed, at once when a get() goes over the bound or
// when the last handle of a pack is released while over it. Held packs are
// never evicted, so the number of open pack fds is at most
// max(capacity, packs held right now).
//
// get() opens a pack that is not open (a syscall: not on a reactor thread);
// try_get() never does, for callers that must not block. drop() forgets a
// pack (GC unlinked or replaced it); holders keep reading their open fd.
//
// Thread-safety: every method may be called from any thread. open() and the
// closing of evicted files run outside the cache's mutex.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"

namespace rpoint::store {

// An open, read-only pack file; shared by everyone reading from it, closed
// when the last holder (or the cache) lets go.
struct PackFd {
  uint64_t id = 0;
  UniqueFd fd;
  std::string path;

  // The same pack opened O_DIRECT, for large reads that should not go
  // through the page cache (a restore reads every chunk once: a buffered
  // read would copy each byte from the page cache, a third of a restore's
  // CPU). Opened on first use (a syscall: not on a reactor thread); -1 when
  // the filesystem refuses O_DIRECT or the open fails (readers then use fd).
  int direct_fd() const;

 private:
  mutable std::once_flag direct_once_;
  mutable UniqueFd direct_;
};

class PackCache : public std::enable_shared_from_this<PackCache> {
 public:
  static constexpr size_t kDefaultCapacity = 128;

  // Handles may outlive the Store that asked for them: the cache is shared.
  static std::shared_ptr<PackCache> Create(size_t capacity = kDefaultCapacity);
  PackCache(const PackCache&) = delete;
  PackCache& operator=(const PackCache&) = delete;

  // Each Store takes an owner tag; its packs are keyed (owner, pack id).
  uint64_t new_owner();

  // The open pack, opening `path` if needed.
  Result<std::shared_ptr<PackFd>> get(uint64_t owner, uint64_t pack, const std::string& path);
  // The pack if it is open now, else nullptr; never a syscall.
  std::shared_ptr<PackFd> try_get(uint64_t owner, uint64_t pack);
  // Forgets one pack, or every pack of an owner (a Store going away).
  void drop(uint64_t owner, uint64_t pack);
  void drop_owner(uint64_t owner);

  size_t capacity() const { return capacity_; }
  size_t open_count();  // packs the cache knows (held or not)
  size_t held_count();  // of those, packs someone holds a handle to

 private:
  struct Key {
    uint64_t owner, pack;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return k.pack * 0x9E3779B97F4A7C15ull ^ k.owner; }
  };
  struct Entry {
    std::shared_ptr<PackFd> fd;  // the file; handles share it
    size_t holds = 0;            // handles given out and not yet released
    std::list<Key>::iterator lru;
  };
  explicit PackCache(size_t capacity);
  // A new handle on e (one more hold); releasing it calls release().
  std::shared_ptr<PackFd> hand_out_locked(const Key& k, Entry& e);
  void release(const Key& k, const PackFd* fd);
  // Moves unheld packs beyond the bound into `out` (closed by the caller,
  // after unlocking). Caller holds mu_.
  void evict_locked(std::vector<std::shared_ptr<PackFd>>* out);

  const size_t capacity_;
  std::mutex mu_;
  uint64_t next_owner_ = 1;
  std::list<Key> lru_;  // front: most recently used
  std::unordered_map<Key, Entry, KeyHash> map_;
};

}  // namespace rpoint::store
