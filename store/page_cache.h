// PageCache: an LRU of verified tree pages, keyed by digest.
//
// Pages are immutable and named by their content, so a cached page is never
// stale: GC may drop the object from disk, but whoever still holds the digest
// holds a pin that kept it alive, and a page found here is the right content
// for its name either way. Readers of hot disks hit here instead of the packs.
//
// Thread-safety: all methods safe from any thread (one mutex, held only for
// hash-map work).
#pragma once

#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "store/digest.h"
#include "store/format.h"

namespace rpoint::store {

class PageCache {
 public:
  explicit PageCache(size_t capacity_pages) : capacity_(capacity_pages ? capacity_pages : 1) {}

  std::shared_ptr<const Page> get(const Digest& d) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(d);
    if (it == map_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
  }

  void put(const Digest& d, std::shared_ptr<const Page> p) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(d);
    if (it != map_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      return;
    }
    lru_.emplace_front(d, std::move(p));
    map_.emplace(d, lru_.begin());
    while (map_.size() > capacity_) {
      map_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }

  void erase(const Digest& d) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(d);
    if (it == map_.end()) return;
    lru_.erase(it->second);
    map_.erase(it);
  }

 private:
  using Entry = std::pair<Digest, std::shared_ptr<const Page>>;
  std::mutex mu_;
  size_t capacity_;
  std::list<Entry> lru_;
  std::unordered_map<Digest, std::list<Entry>::iterator, DigestHash> map_;
};

}  // namespace rpoint::store
