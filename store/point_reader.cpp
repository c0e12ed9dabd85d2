#include "store/point_reader.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "store/file_util.h"
#include "store/macros.h"

namespace rpoint::store {

PointReader::PointReader(std::shared_ptr<Store> store, PointInfo info)
    : store_(std::move(store)), info_(std::move(info)) {
  slots_ = (info_.size + info_.chunk_size - 1) / info_.chunk_size;
  tree_ = TreeView(store_.get(), info_.root, info_.depth);
}

PointReader::~PointReader() {
  store_->unpin(info_.root, info_.depth);
}

Result<Digest> PointReader::slot_digest(uint64_t slot) {
  if (slot >= slots_) return Status::OutOfRange("slot beyond the disk");
  return tree_.node(0, slot);
}

Result<std::vector<PointReader::Location>> PointReader::resolve(uint64_t first, uint32_t count) {
  if (count == 0) return std::vector<Location>();
  if ((first >> kFanoutShift) != ((first + count - 1) >> kFanoutShift) || first + count > slots_) {
    return Status::InvalidArgument("resolve: slots must lie in one leaf of the disk");
  }
  STORE_ASSIGN_OR_RETURN(auto leaf, tree_.page(1, first >> kFanoutShift));
  std::vector<Location> out(count);
  std::vector<Digest> want;
  std::vector<uint32_t> at;  // want[j] is slot first + at[j]
  want.reserve(count);
  at.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    const Digest& d = leaf->e[(first + i) & (kFanout - 1)];
    if (d.is_zero()) continue;
    out[i].digest = d;
    want.push_back(d);
    at.push_back(i);
  }
  if (want.empty()) return out;
  // The whole leaf's chunks in one index lookup, not a round trip per chunk.
  std::shared_lock<std::shared_mutex> g(store_->gc_mu_);
  STORE_ASSIGN_OR_RETURN(auto locs, store_->catalog_->lookup_many(want.data(), want.size()));
  std::shared_ptr<PackFd> fd;
  for (size_t j = 0; j < want.size(); ++j) {
    Location& l = out[at[j]];
    if (!locs[j]) {
      l.state = Location::kMissing;
      continue;
    }
    if (!fd || fd->id != locs[j]->pack) {
      auto f = store_->pack_fd_locked(locs[j]->pack);
      if (!f.ok()) {
        // A pack file gone missing is damage to report per slot, not a reason
        // to fail the slots around it.
        if (f.status().code() == Code::kNotFound) {
          l.state = Location::kMissing;
          fd.reset();
          continue;
        }
        return f.status();
      }
      fd = std::move(f).value();
    }
    l.state = Location::kData;
    l.offset = locs[j]->offset;
    l.pack = fd;
  }
  return out;
}

Result<std::shared_ptr<PackFd>> PointReader::pack(uint64_t id) {
  std::shared_lock<std::shared_mutex> g(store_->gc_mu_);
  return store_->pack_fd_locked(id);
}

std::shared_ptr<PackFd> PointReader::open_pack(uint64_t id) {
  return store_->open_pack_fd(id);
}

Status PointReader::chunk_error(uint64_t slot, const std::string& what) const {
  const uint64_t cs = info_.chunk_size;
  uint64_t a = slot * cs, b = std::min(info_.size, a + cs);
  return Status::IoError("point " + std::to_string(info_.id) + ", disk bytes [" +
                         std::to_string(a) + ", " + std::to_string(b) + ") (slot " +
                         std::to_string(slot) + "): " + what);
}

Status PointReader::damaged_chunk(uint64_t slot, const Digest& d, uint64_t pack, uint64_t offset) {
  store_->quarantine(d, ObjectLoc{pack, offset, info_.chunk_size}, "read: chunk checksum mismatch");
  return chunk_error(slot, "chunk " + d.short_hex() + " in pack " + std::to_string(pack) + " at " +
                               std::to_string(offset) + " fails its checksum (quarantined)");
}

Status PointReader::check_chunk(uint64_t slot, const Location& l, const void* data) {
  if (Sha256(data, info_.chunk_size) == l.digest) return Status::Ok();
  return damaged_chunk(slot, l.digest, l.pack->id, l.offset);
}

Status PointReader::read(uint64_t offset, uint64_t len, void* buf, ReadMode mode) {
  if (offset > info_.size || len > info_.size - offset) {
    return Status::OutOfRange("read beyond the end of the disk point");
  }
  auto* out = static_cast<char*>(buf);
  const uint64_t cs = info_.chunk_size;
  // Every chunk is read whole so it can be checked: chunks the range covers
  // entirely go straight into buf (contiguous ones of one pack in one pread),
  // a partly covered one (at most the first and the last) through `part`.
  struct Piece {
    uint64_t slot;
    const Location* loc;
    char* data;
  };
  std::vector<Piece> run;  // whole chunks, back to back in one pack and in buf
  std::vector<char> part;
  auto flush = [&]() -> Status {
    if (run.empty()) return Status::Ok();
    const Location& l0 = *run.front().loc;
    const int direct = mode == ReadMode::kDirect ? l0.pack->direct_fd() : -1;
    Status s = PreadDirect(direct, l0.pack->fd.get(), run.front().data, run.size() * cs, l0.offset,
                           "pack " + std::to_string(l0.pack->id));
    for (size_t i = 0; i < run.size() && s.ok(); ++i) {
      s = check_chunk(run[i].slot, *run[i].loc, run[i].data);
    }
    run.clear();
    return s;
  };
  uint64_t pos = offset, end = offset + len;
  while (pos < end) {
    uint64_t slot = pos / cs;
    uint64_t leaf_end_slot = ((slot >> kFanoutShift) + 1) << kFanoutShift;
    uint64_t last_slot = std::min({leaf_end_slot, slots_, (end + cs - 1) / cs});
    STORE_ASSIGN_OR_RETURN(auto locs, resolve(slot, uint32_t(last_slot - slot)));
    for (uint64_t s = slot; s < last_slot; ++s) {
      uint64_t a = std::max(pos, s * cs), b = std::min(end, (s + 1) * cs);
      char* dst = out + (a - offset);
      const Location& l = locs[s - slot];
      if (l.state == Location::kHole) {
        std::memset(dst, 0, b - a);
      } else if (l.state == Location::kMissing) {
        return chunk_error(
            s, "chunk " + l.digest.short_hex() + " is missing from the store (damaged or lost)");
      } else if (a != s * cs || b != (s + 1) * cs) {
        STORE_RETURN_IF_ERROR(flush());
        part.resize(cs);
        STORE_RETURN_IF_ERROR(PreadFull(l.pack->fd.get(), part.data(), cs, l.offset,
                                        "pack " + std::to_string(l.pack->id)));
        STORE_RETURN_IF_ERROR(check_chunk(s, l, part.data()));
        std::memcpy(dst, part.data() + (a - s * cs), b - a);
      } else {
        if (!run.empty()) {
          const Piece& p = run.back();
          if (p.loc->pack->fd.get() != l.pack->fd.get() || l.offset != p.loc->offset + cs ||
              dst != p.data + cs) {
            STORE_RETURN_IF_ERROR(flush());
          }
        }
        run.push_back(Piece{s, &l, dst});
      }
      pos = b;
    }
    // `run` points into `locs`: read it before the next leaf's resolve.
    STORE_RETURN_IF_ERROR(flush());
  }
  return Status::Ok();
}

namespace {

// Builds a merged extent map of the bytes [offset, end) from runs of slots.
struct ExtentSink {
  uint64_t offset, end, cs;
  size_t max_extents;
  std::vector<Extent> out;
  bool full = false;

  void emit(uint64_t slot_a, uint64_t slot_b, uint32_t flags) {
    uint64_t a = std::max(offset, slot_a * cs), b = std::min(end, slot_b * cs);
    if (a >= b) return;
    if (!out.empty() && out.back().flags == flags) {
      out.back().length += b - a;
    } else if (out.size() < max_extents) {
      out.push_back(Extent{b - a, flags});
    } else {
      full = true;
    }
  }
};

}  // namespace

Result<std::vector<Extent>> PointReader::extents(uint64_t offset, uint64_t len,
                                                 size_t max_extents) {
  if (offset > info_.size || len > info_.size - offset) {
    return Status::OutOfRange("extents beyond the end of the disk point");
  }
  if (len == 0 || max_extents == 0) return std::vector<Extent>();
  const uint64_t cs = info_.chunk_size;
  ExtentSink sink{offset, offset + len, cs, max_extents, {}};
  const uint64_t s0 = offset / cs, s1 = (sink.end + cs - 1) / cs;

  // Depth-first over the tree, visiting only subtrees that overlap [s0, s1);
  // a zero digest at any level is one hole run for its whole span.
  std::function<Status(uint32_t, uint64_t, const Digest&)> walk =
      [&](uint32_t level, uint64_t index, const Digest& d) -> Status {
    uint64_t span = uint64_t(1) << (kFanoutShift * level);
    uint64_t first = index * span, last = first + span;
    if (last <= s0 || first >= s1 || sink.full) return Status::Ok();
    if (d.is_zero() || level == 0) {
      sink.emit(std::max(first, s0), std::min(last, s1),
                d.is_zero() ? (Extent::kHole | Extent::kZero) : 0);
      return Status::Ok();
    }
    STORE_ASSIGN_OR_RETURN(auto page, store_->load_page(d));
    uint64_t child_span = span >> kFanoutShift;
    uint32_t i0 = first >= s0 ? 0 : uint32_t((s0 - first) / child_span);
    for (uint32_t i = i0; i < kFanout && !sink.full; ++i) {
      uint64_t child = index * kFanout + i;
      if (child * child_span >= s1) break;
      STORE_RETURN_IF_ERROR(walk(level - 1, child, page->e[i]));
    }
    return Status::Ok();
  };
  STORE_RETURN_IF_ERROR(walk(tree_.depth(), 0, tree_.root()));
  // The tree covers every slot, so at least one extent was emitted.
  if (sink.out.empty()) return Status::Internal("extents: empty map");
  return std::move(sink.out);
}

Result<std::vector<Extent>> PointReader::changed_extents(PointReader& other, uint64_t offset,
                                                         uint64_t len, size_t max_extents) {
  if (offset > info_.size || len > info_.size - offset) {
    return Status::OutOfRange("changed extents beyond the end of the disk point");
  }
  if (other.chunk_size() != chunk_size()) {
    return Status::InvalidArgument("changed extents: the points have different chunk sizes");
  }
  if (len == 0 || max_extents == 0) return std::vector<Extent>();
  const uint64_t cs = info_.chunk_size;
  ExtentSink sink{offset, offset + len, cs, max_extents, {}};
  const uint64_t s0 = offset / cs, s1 = (sink.end + cs - 1) / cs;

  // One tree's node at (level, index) while walking both in step. Above a
  // tree's own root its nodes are "virtual": index 0 contains the root, any
  // other index lies past its end (a hole). The trees may differ in depth
  // (the disk was resized), but a node covers the same slots in both.
  struct Side {
    PointReader* r;
    bool virt;
    Digest d;
  };
  auto top = [](PointReader* r, uint32_t level) {
    return Side{r, level > r->depth(), level > r->depth() ? Digest() : r->tree_.root()};
  };
  using PageRef = std::shared_ptr<const Page>;
  auto page_of = [](const Side& s) -> Result<PageRef> {
    if (s.virt || s.d.is_zero()) return PageRef();
    return s.r->store_->load_page(s.d);
  };
  auto child = [](const Side& s, const PageRef& page, uint32_t level, uint32_t i) {
    if (s.virt) {
      if (i != 0) return Side{s.r, false, Digest()};
      return Side{s.r, level - 1 > s.r->depth(),
                  level - 1 > s.r->depth() ? Digest() : s.r->tree_.root()};
    }
    return Side{s.r, false, page ? page->e[i] : Digest()};
  };

  // Equal digests mean equal content below, so only differing subtrees are
  // opened: the cost is the size of the difference, never of the disk.
  std::function<Status(uint32_t, uint64_t, const Side&, const Side&)> walk =
      [&](uint32_t level, uint64_t index, const Side& a, const Side& b) -> Status {
    uint64_t span = uint64_t(1) << (kFanoutShift * level);
    uint64_t first = index * span, last = first + span;
    if (last <= s0 || first >= s1 || sink.full) return Status::Ok();
    if (!a.virt && !b.virt && (a.d == b.d || level == 0)) {
      sink.emit(std::max(first, s0), std::min(last, s1), a.d == b.d ? 0 : MetaContext::kDirty);
      return Status::Ok();
    }
    STORE_ASSIGN_OR_RETURN(PageRef pa, page_of(a));
    STORE_ASSIGN_OR_RETURN(PageRef pb, page_of(b));
    uint64_t child_span = span >> kFanoutShift;
    uint32_t i0 = first >= s0 ? 0 : uint32_t((s0 - first) / child_span);
    for (uint32_t i = i0; i < kFanout && !sink.full; ++i) {
      uint64_t c = index * kFanout + i;
      if (c * child_span >= s1) break;
      STORE_RETURN_IF_ERROR(walk(level - 1, c, child(a, pa, level, i), child(b, pb, level, i)));
    }
    return Status::Ok();
  };
  uint32_t level = std::max(depth(), other.depth());
  STORE_RETURN_IF_ERROR(walk(level, 0, top(this, level), top(&other, level)));
  if (sink.out.empty()) return Status::Internal("changed extents: empty map");
  return std::move(sink.out);
}

}  // namespace rpoint::store
