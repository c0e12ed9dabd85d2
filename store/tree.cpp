#include "store/tree.h"

#include "store/macros.h"
#include "store/store.h"

namespace rpoint::store {

const std::shared_ptr<const Page>& ZeroPage() {
  static const std::shared_ptr<const Page> zero = std::make_shared<const Page>();
  return zero;
}

Result<Digest> TreeView::node(uint32_t level, uint64_t index) const {
  if (level > depth_) return Status::Internal("tree level above the root");
  if (level == depth_) return index == 0 ? root_ : Digest{};
  // Past the tree's range: a hole (a grown disk's new slots, or beyond the end).
  uint32_t shift = kFanoutShift * (depth_ - level);
  if (shift < 64 && (index >> shift) != 0) return Digest{};
  STORE_ASSIGN_OR_RETURN(auto p, page(level + 1, index >> kFanoutShift));
  return p->e[index & (kFanout - 1)];
}

Result<std::shared_ptr<const Page>> TreeView::page(uint32_t level, uint64_t index) const {
  if (level == 0) return Status::Internal("level 0 has no pages");
  STORE_ASSIGN_OR_RETURN(Digest d, node(level, index));
  if (d.is_zero()) return ZeroPage();
  return store_->load_page(d);
}

}  // namespace rpoint::store
