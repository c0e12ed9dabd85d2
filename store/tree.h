// TreeView: read-only walks over one disk image map (a root digest + depth).
//
// Nodes are addressed as (level, index): level 0 are chunk slots, level L >= 1
// are pages, each covering 128^L slots; the root is (depth, 0). Anything past
// the end of the tree is a hole. Pages come through the store's page cache and
// are verified against their digest when first read.
//
// Thread-safety: a TreeView is an immutable value; its methods are safe from
// any thread. The caller keeps the root pinned (or otherwise alive) while
// walking.
#pragma once

#include <cstdint>
#include <memory>

#include "common/status.h"
#include "store/digest.h"
#include "store/format.h"

namespace rpoint::store {

class Store;

// The page of all holes.
const std::shared_ptr<const Page>& ZeroPage();

class TreeView {
 public:
  TreeView() = default;
  TreeView(Store* store, const Digest& root, uint32_t depth)
      : store_(store), root_(root), depth_(depth) {}

  const Digest& root() const { return root_; }
  uint32_t depth() const { return depth_; }

  // Digest of node (level, index), 0 <= level <= depth.
  Result<Digest> node(uint32_t level, uint64_t index) const;
  // The page named by node(level, index), level >= 1 (the zero page for holes).
  Result<std::shared_ptr<const Page>> page(uint32_t level, uint64_t index) const;

 private:
  Store* store_ = nullptr;
  Digest root_;
  uint32_t depth_ = 1;
};

}  // namespace rpoint::store
