#include "store/pack_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "common/file_io.h"

namespace rpoint::store {

PackCache::PackCache(size_t capacity) : capacity_(capacity < 1 ? 1 : capacity) {}

std::shared_ptr<PackCache> PackCache::Create(size_t capacity) {
  return std::shared_ptr<PackCache>(new PackCache(capacity));
}

uint64_t PackCache::new_owner() {
  std::lock_guard<std::mutex> lock(mu_);
  return next_owner_++;
}

std::shared_ptr<PackFd> PackCache::hand_out_locked(const Key& k, Entry& e) {
  ++e.holds;
  lru_.splice(lru_.begin(), lru_, e.lru);
  // The handle owns a reference to the file itself, so a pack dropped from
  // the cache (GC) stays open for its holders; its deleter tells the cache.
  std::shared_ptr<PackFd> file = e.fd;
  PackFd* raw = file.get();
  std::weak_ptr<PackCache> cache = weak_from_this();
  return std::shared_ptr<PackFd>(raw, [cache, k, file](PackFd* p) mutable {
    if (auto c = cache.lock()) c->release(k, p);
    file.reset();  // may close the fd: after release() has unlocked
  });
}

void PackCache::release(const Key& k, const PackFd* fd) {
  std::vector<std::shared_ptr<PackFd>> evicted;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(k);
  if (it == map_.end() || it->second.fd.get() != fd) return;  // dropped meanwhile
  if (--it->second.holds == 0 && map_.size() > capacity_) evict_locked(&evicted);
}

std::shared_ptr<PackFd> PackCache::try_get(uint64_t owner, uint64_t pack) {
  std::lock_guard<std::mutex> lock(mu_);
  Key k{owner, pack};
  auto it = map_.find(k);
  if (it == map_.end()) return nullptr;
  return hand_out_locked(k, it->second);
}

int PackFd::direct_fd() const {
  // No fault point: a failure is the buffered fallback (-1), not an error.
  std::call_once(direct_once_, [this] {
    if (auto fd = OpenFile(path, O_RDONLY | O_DIRECT | O_CLOEXEC); fd.ok()) {
      direct_ = std::move(fd).value();
    }
  });
  return direct_.get();
}

Result<std::shared_ptr<PackFd>> PackCache::get(uint64_t owner, uint64_t pack,
                                               const std::string& path) {
  if (auto fd = try_get(owner, pack)) return fd;
  // Open outside the lock: a slow open must not stall try_get() on a reactor.
  auto p = std::make_shared<PackFd>();
  p->id = pack;
  p->path = path;
  auto fd = OpenFile(path, O_RDONLY | O_CLOEXEC, 0, "pack.open", "pack " + path);
  if (!fd.ok()) return fd.status();
  p->fd = std::move(fd).value();
  std::vector<std::shared_ptr<PackFd>> evicted;
  std::shared_ptr<PackFd> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Key k{owner, pack};
    auto it = map_.find(k);
    if (it != map_.end()) {
      evicted.push_back(std::move(p));  // opened meanwhile by another thread: close ours
    } else {
      lru_.push_front(k);
      it = map_.emplace(k, Entry{std::move(p), 0, lru_.begin()}).first;
    }
    out = hand_out_locked(k, it->second);
    evict_locked(&evicted);
  }
  return out;  // `evicted` closes its files here, unlocked
}

void PackCache::evict_locked(std::vector<std::shared_ptr<PackFd>>* out) {
  auto it = lru_.end();
  while (map_.size() > capacity_ && it != lru_.begin()) {
    --it;
    auto m = map_.find(*it);
    if (m->second.holds != 0) continue;  // in use: never closed under a reader
    out->push_back(std::move(m->second.fd));
    map_.erase(m);
    it = lru_.erase(it);
  }
}

void PackCache::drop(uint64_t owner, uint64_t pack) {
  std::shared_ptr<PackFd> gone;  // destroyed after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(Key{owner, pack});
  if (it == map_.end()) return;
  gone = std::move(it->second.fd);
  lru_.erase(it->second.lru);
  map_.erase(it);
}

void PackCache::drop_owner(uint64_t owner) {
  std::vector<std::shared_ptr<PackFd>> gone;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (it->owner != owner) {
      ++it;
      continue;
    }
    auto m = map_.find(*it);
    gone.push_back(std::move(m->second.fd));
    map_.erase(m);
    it = lru_.erase(it);
  }
}

size_t PackCache::open_count() {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.size();
}

size_t PackCache::held_count() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [k, e] : map_) n += e.holds != 0;
  return n;
}

}  // namespace rpoint::store
