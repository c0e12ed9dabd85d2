#include "store/point_device.h"

#include <pthread.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "store/macros.h"

namespace rpoint::store {
namespace {

// IoRequest progress while reading (the engine-private fields):
//   stage_ = ring operations still outstanding for the request;
//   done_  = bytes delivered (holes count when zero-filled) in the low 48 bits,
//            the first errno seen in the high 16.
constexpr int kErrShift = 48;
constexpr uint64_t kBytesMask = (uint64_t(1) << kErrShift) - 1;
// One SQE reads at most this much (the CQE result is an int).
constexpr uint64_t kMaxRun = 1u << 30;

void NoteError(IoRequest& req, int err) {
  if ((req.done_ >> kErrShift) == 0) req.done_ |= uint64_t(err & 0xffff) << kErrShift;
}

}  // namespace

Result<std::shared_ptr<PointDevice>> PointDevice::Create(std::shared_ptr<PointReader> reader,
                                                         std::string name, size_t cache_leaves) {
  if (!reader) return Status::InvalidArgument("PointDevice without a reader");
  std::shared_ptr<PointDevice> d(
      new PointDevice(std::move(reader), std::move(name), std::max<size_t>(cache_leaves, 8)));
  d->resolver_ = std::thread([raw = d.get()] {
    std::string tname = "rp-res-" + raw->name_;
    pthread_setname_np(pthread_self(), tname.substr(0, 15).c_str());
    raw->resolver_loop();
  });
  return d;
}

PointDevice::PointDevice(std::shared_ptr<PointReader> reader, std::string name, size_t cache_leaves)
    : reader_(std::move(reader)), name_(std::move(name)), cache_cap_(cache_leaves) {}

PointDevice::~PointDevice() {
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    stopping_ = true;
  }
  jobs_cv_.notify_all();
  if (resolver_.joinable()) resolver_.join();
}

DeviceCaps PointDevice::caps() const {
  DeviceCaps c;
  c.read_only = true;
  c.can_flush = true;
  c.can_trim = false;
  c.can_zero = false;
  c.can_fast_zero = false;
  c.can_cache = false;
  c.can_multi_conn = true;  // immutable content: every connection sees the same bytes
  c.min_block = 1;
  c.preferred_block = std::min<uint32_t>(reader_->chunk_size(), 1u << 20);
  return c;
}

void PointDevice::finish(IoRequest& req) {
  int err = int(req.done_ >> kErrShift);
  if (err != 0) {
    req.on_done(-err);
  } else if ((req.done_ & kBytesMask) != req.length) {
    req.on_done(-EIO);  // a short read: the pack is shorter than the index says
  } else {
    req.on_done(0);
  }
}

// Completes req from the ring (a NOP), never from inside submit().
void PointDevice::finish_async(Reactor& reactor, IoRequest& req, int err) {
  req.done_ = req.length;
  if (err != 0) NoteError(req, err);
  req.stage_ = 1;
  io_uring_prep_nop(reactor.sqe(&req));
}

void PointDevice::submit(Reactor& reactor, IoRequest& req) {
  req.device_ = this;
  req.reactor_ = &reactor;
  req.done_ = 0;
  req.stage_ = 0;
  switch (req.kind) {
    case IoKind::kRead:
    case IoKind::kBlockStatus:
      break;
    case IoKind::kFlush:
    case IoKind::kCache:
      finish_async(reactor, req, 0);
      return;
    default:
      finish_async(reactor, req, EPERM);
      return;
  }
  if (!check_range(req.offset, req.length).ok()) {
    finish_async(reactor, req, EINVAL);
    return;
  }
  if (req.length == 0) {
    finish_async(reactor, req, 0);
    return;
  }
  std::vector<LeafRef> leaves;
  Pins pins;
  // Block status reads tree pages (and maybe SQLite): always the resolver's job.
  if (req.kind == IoKind::kRead && cached_leaves(req, &leaves) &&
      pin_packs(req, leaves, false, &pins)) {
    issue(reactor, req, leaves, std::move(pins));
    return;
  }
  slow_.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    jobs_.push_back(Job{&reactor, &req});
  }
  jobs_cv_.notify_one();
}

bool PointDevice::cached_leaves(const IoRequest& req, std::vector<LeafRef>* out) {
  const uint64_t cs = reader_->chunk_size();
  uint64_t l0 = (req.offset / cs) >> kFanoutShift;
  uint64_t l1 = ((req.offset + req.length - 1) / cs) >> kFanoutShift;
  out->clear();
  out->reserve(l1 - l0 + 1);
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t l = l0; l <= l1; ++l) {
    auto it = cache_.find(l);
    if (it == cache_.end()) return false;
    lru_.splice(lru_.begin(), lru_, it->second.second);
    out->push_back(it->second.first);
  }
  return true;
}

Result<PointDevice::LeafRef> PointDevice::resolve_leaf(uint64_t leaf, Pins* pins) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(leaf);
    if (it != cache_.end()) return it->second.first;
  }
  uint64_t first = leaf << kFanoutShift;
  uint32_t count = uint32_t(std::min<uint64_t>(kFanout, reader_->slots() - first));
  STORE_ASSIGN_OR_RETURN(auto locs, reader_->resolve(first, count));
  auto l = std::make_shared<Leaf>();
  for (uint32_t i = 0; i < count; ++i) {
    const auto& loc = locs[i];
    if (loc.state == PointReader::Location::kHole) continue;
    l->s[i].digest = loc.digest;
    if (loc.state == PointReader::Location::kMissing) {
      l->s[i].state = Slot::kMissing;
      continue;
    }
    // The leaf keeps the pack's id only; the handle resolve() took (atomic
    // with the index lookup, against GC) serves this request.
    l->s[i].state = Slot::kData;
    l->s[i].offset = loc.offset;
    l->s[i].pack = loc.pack->id;
    bool have = false;
    for (const auto& p : *pins) have = have || p->id == loc.pack->id;
    if (!have) pins->push_back(loc.pack);
  }
  LeafRef ref = l;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = cache_.find(leaf);
  if (it != cache_.end()) return it->second.first;  // resolved meanwhile
  lru_.push_front(leaf);
  cache_.emplace(leaf, std::make_pair(ref, lru_.begin()));
  while (cache_.size() > cache_cap_) {
    cache_.erase(lru_.back());
    lru_.pop_back();
  }
  return ref;
}

bool PointDevice::pin_packs(const IoRequest& req, const std::vector<LeafRef>& leaves, bool open,
                            Pins* pins) {
  const uint64_t cs = reader_->chunk_size();
  const uint64_t s0 = req.offset / cs, s1 = (req.offset + req.length - 1) / cs;
  const uint64_t l0 = s0 >> kFanoutShift;
  uint64_t last = 0;  // runs of slots in one pack are the common case
  for (uint64_t slot = s0; slot <= s1; ++slot) {
    const Slot& s = leaves[(slot >> kFanoutShift) - l0]->s[slot & (kFanout - 1)];
    if (s.state != Slot::kData || s.pack == last) continue;
    last = s.pack;
    bool have = false;
    for (const auto& p : *pins) have = have || p->id == s.pack;
    if (have) continue;
    std::shared_ptr<PackFd> h;
    if (open) {
      auto r = reader_->pack(s.pack);
      if (r.ok()) h = std::move(r).value();
    } else {
      h = reader_->open_pack(s.pack);
    }
    if (!h) return false;
    pins->push_back(std::move(h));
  }
  return true;
}

void PointDevice::resolver_loop() {
  for (;;) {
    Job job;
    std::deque<Damaged> damaged;
    {
      std::unique_lock<std::mutex> lock(jobs_mu_);
      jobs_cv_.wait(lock, [this] { return stopping_ || !jobs_.empty() || !damaged_.empty(); });
      if (stopping_) return;
      damaged.swap(damaged_);
      if (jobs_.empty()) {
        job.req = nullptr;
      } else {
        job = jobs_.front();
        jobs_.pop_front();
      }
    }
    for (const Damaged& d : damaged) {
      Status why = reader_->damaged_chunk(d.slot, d.s.digest, d.s.pack, d.s.offset);
      spdlog::error("export {}: {}", name_, why.message());
      // Dropped again now that the index no longer names the damaged copy:
      // a read that re-resolved meanwhile may have cached it.
      drop_leaf(d.leaf);
    }
    if (job.req == nullptr) continue;
    IoRequest* req = job.req;
    if (req->kind == IoKind::kBlockStatus) {
      answer_block_status(job);
      continue;
    }
    const uint64_t cs = reader_->chunk_size();
    uint64_t l0 = (req->offset / cs) >> kFanoutShift;
    uint64_t l1 = ((req->offset + req->length - 1) / cs) >> kFanoutShift;
    std::vector<LeafRef> leaves;
    Pins pins;
    Status st;
    // A cached leaf may name a pack GC has since rewritten and removed: then
    // drop the request's leaves and resolve them afresh (once is enough: a
    // fresh resolve takes its handles atomically with the index lookup).
    for (int attempt = 0; attempt < 2; ++attempt) {
      leaves.clear();
      pins.clear();
      for (uint64_t l = l0; l <= l1 && st.ok(); ++l) {
        auto r = resolve_leaf(l, &pins);
        if (r.ok()) {
          leaves.push_back(std::move(r).value());
        } else {
          st = r.status();
        }
      }
      if (!st.ok() || pin_packs(*req, leaves, true, &pins)) break;
      for (uint64_t l = l0; l <= l1; ++l) drop_leaf(l);
      if (attempt == 1) st = Status::IoError("a pack the point names cannot be opened");
    }
    if (!st.ok()) {
      spdlog::error("export {}: resolving [{}, +{}): {}", name_, req->offset, req->length,
                    st.ToString());
      job.reactor->post([this, reactor = job.reactor, req] { finish_async(*reactor, *req, EIO); });
      continue;
    }
    job.reactor->post([this, reactor = job.reactor, req, leaves = std::move(leaves),
                       pins = std::move(pins)] { issue(*reactor, *req, leaves, pins); });
  }
}

void PointDevice::drop_leaf(uint64_t leaf) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = cache_.find(leaf);
  if (it == cache_.end()) return;
  lru_.erase(it->second.second);
  cache_.erase(it);
}

void PointDevice::answer_block_status(const Job& job) {
  IoRequest* req = job.req;
  req->extents.clear();
  req->context_extents.clear();
  auto ext = reader_->extents(req->offset, req->length, req->max_extents);
  int err = 0;
  if (ext.ok()) {
    req->extents = std::move(ext).value();
  } else {
    spdlog::error("export {}: block status [{}, +{}): {}", name_, req->offset, req->length,
                  ext.status().ToString());
    err = EIO;
  }
  // Further contexts (rpoint:changed:...) walk trees too: here, not on the reactor.
  if (req->contexts) {
    for (const auto& ctx : *req->contexts) {
      if (err != 0) break;
      auto m = ctx->extents(req->offset, req->length, req->max_extents);
      if (!m.ok()) {
        spdlog::error("export {}: {} [{}, +{}): {}", name_, ctx->name(), req->offset, req->length,
                      m.status().ToString());
        err = EIO;
        break;
      }
      req->context_extents.push_back(std::move(m).value());
    }
  }
  job.reactor->post([this, reactor = job.reactor, req, err] { finish_async(*reactor, *req, err); });
}

void PointDevice::issue(Reactor& reactor, IoRequest& req, const std::vector<LeafRef>& leaves,
                        Pins pins) {
  const uint64_t cs = reader_->chunk_size();
  const uint64_t l0 = (req.offset / cs) >> kFanoutShift;
  auto st = std::make_unique<ReadState>();
  st->leaves = leaves;
  st->pins = std::move(pins);
  auto fd_of = [&](uint64_t pack) {
    for (const auto& p : st->pins) {
      if (p->id == pack) return p->fd.get();
    }
    return -1;  // pin_packs pinned every pack of the request
  };
  req.stage_ = 0;
  int run_fd = -1;
  uint64_t run_off = 0, run_len = 0;
  char* run_buf = nullptr;
  auto flush_run = [&] {
    if (run_len == 0) return;
    ++req.stage_;
    io_uring_prep_read(reactor.sqe(&req), run_fd, run_buf, unsigned(run_len), run_off);
    run_len = 0;
  };
  // done_ counts bytes zero-filled or read (bounce buffers included); the
  // request is whole when it reaches `expect`.
  uint64_t expect = 0;
  uint64_t pos = req.offset, end = req.offset + req.length;
  while (pos < end) {
    uint64_t slot = pos / cs;
    uint64_t next = std::min(end, (slot + 1) * cs);
    uint64_t leaf = slot >> kFanoutShift;
    const Slot& s = st->leaves[leaf - l0]->s[slot & (kFanout - 1)];
    char* dst = req.buf + (pos - req.offset);
    const int fd = s.state == Slot::kData ? fd_of(s.pack) : -1;
    if (s.state == Slot::kHole) {
      std::memset(dst, 0, next - pos);
      req.done_ += next - pos;
      expect += next - pos;
    } else if (fd < 0) {
      // Missing: not cached, so a fresh copy stored later is found.
      NoteError(req, EIO);
      drop_leaf(leaf);
    } else if (pos != slot * cs || next != (slot + 1) * cs) {
      // Covered in part: read the whole chunk aside, to check it.
      flush_run();
      st->bounce.push_back(std::make_unique<char[]>(cs));
      char* b = st->bounce.back().get();
      ++req.stage_;
      io_uring_prep_read(reactor.sqe(&req), fd, b, unsigned(cs), s.offset);
      expect += cs;
      st->checks.push_back(Check{slot, &s, b, dst, pos - slot * cs, next - pos});
    } else {
      if (run_len > 0 && fd == run_fd && s.offset == run_off + run_len &&
          dst == run_buf + run_len && run_len + cs <= kMaxRun) {
        run_len += cs;
      } else {
        flush_run();
        run_fd = fd;
        run_off = s.offset;
        run_len = cs;
        run_buf = dst;
      }
      expect += cs;
      st->checks.push_back(Check{slot, &s, dst});
    }
    pos = next;
  }
  flush_run();
  if (req.stage_ == 0) {
    // All holes (or all failed): complete through the ring, not from here.
    if ((req.done_ >> kErrShift) == 0) req.done_ = req.length;
    req.stage_ = 1;
    io_uring_prep_nop(reactor.sqe(&req));
    return;
  }
  st->expect = expect;
  std::lock_guard<std::mutex> lock(states_mu_);
  states_[&req] = std::move(st);
}

bool PointDevice::check(IoRequest& req) {
  std::unique_ptr<ReadState> st;
  {
    std::lock_guard<std::mutex> lock(states_mu_);
    auto it = states_.find(&req);
    if (it == states_.end()) return true;  // holes only, or failed before any read
    st = std::move(it->second);
    states_.erase(it);
  }
  if ((req.done_ >> kErrShift) != 0) return true;  // failed anyway
  if ((req.done_ & kBytesMask) != st->expect) {
    NoteError(req, EIO);  // a short read: the pack is shorter than the index says
    return true;
  }
  const uint64_t cs = reader_->chunk_size();
  std::vector<Damaged> bad;
  for (const Check& c : st->checks) {
    if (Sha256(c.data, cs) != c.s->digest) {
      bad.push_back(Damaged{c.slot >> kFanoutShift, c.slot, *c.s});
      continue;
    }
    if (c.dst) std::memcpy(c.dst, c.data + c.from, c.len);
  }
  req.done_ = req.length;
  if (bad.empty()) return true;
  NoteError(req, EIO);
  for (const Damaged& d : bad) drop_leaf(d.leaf);
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    damaged_.insert(damaged_.end(), bad.begin(), bad.end());
  }
  jobs_cv_.notify_one();
  return false;
}

void PointDevice::on_completion(Reactor&, IoRequest& req, int res) {
  if (res < 0) {
    NoteError(req, -res);
  } else {
    req.done_ += uint64_t(res);
  }
  if (--req.stage_ != 0) return;
  check(req);
  finish(req);
}

Result<std::vector<Extent>> PointDevice::block_status(uint64_t offset, uint64_t length,
                                                      size_t max_extents) {
  STORE_RETURN_IF_ERROR(check_range(offset, length));
  return reader_->extents(offset, length, max_extents);
}

}  // namespace rpoint::store
