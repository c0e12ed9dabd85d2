#include "store/point_writer.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include "store/file_util.h"
#include "store/macros.h"
#include "store/rebuild.h"

namespace rpoint::store {
namespace {

int64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace

PointWriter::PointWriter(std::shared_ptr<Store> store, PointParams params,
                         std::optional<PointRecord> parent)
    : store_(std::move(store)), params_(std::move(params)), parent_(std::move(parent)) {
  slots_ = (params_.size + params_.chunk_size - 1) / params_.chunk_size;
  depth_ = TreeDepth(slots_);
  if (parent_) base_ = TreeView(store_.get(), parent_->root, parent_->depth);
  // The open pack's buffer plus up to three being written (its own or those
  // of full packs waiting for the sealer): appends never wait for a pwrite
  // unless the disk is behind.
  buffers_ = std::make_shared<BufferPool>(
      std::max<size_t>(store_->options().pack_buffer_bytes, 1 << 20), 4);
  max_resident_ = std::max<size_t>(store_->options().writer_leaf_cache_bytes / kPageBytes, 16);
  store_->register_writer(&refs_);
  registered_ = true;
}

PointWriter::~PointWriter() {
  abandon();
}

uint32_t PointWriter::slot_bytes(uint64_t slot) const {
  uint64_t start = slot * params_.chunk_size;
  if (start >= params_.size) return 0;
  return uint32_t(std::min<uint64_t>(params_.chunk_size, params_.size - start));
}

Status PointWriter::put(uint64_t slot, const void* data, size_t len) {
  if (slot >= slots_) {
    return Status::OutOfRange("slot " + std::to_string(slot) + " is beyond the disk's " +
                              std::to_string(slots_) + " slots");
  }
  uint32_t want = slot_bytes(slot);
  if (len < want || len > params_.chunk_size) {
    return Status::InvalidArgument("slot " + std::to_string(slot) + " takes " +
                                   std::to_string(want) + " bytes, got " + std::to_string(len));
  }
  if (data == nullptr) return Status::InvalidArgument("put without data (use put_hole)");
  // The expensive part, outside every lock. Bytes past the disk's end are not
  // part of the disk: the partial last chunk is named and stored zero-padded,
  // so a later grown disk reads zeroes there.
  Item it{slot, Digest{}, nullptr, 0};
  if (!IsAllZero(data, want))
    it = Item{slot, Sha256Padded(data, want, params_.chunk_size), data, want};
  return put_items(&it, 1);
}

Status PointWriter::put_many(const uint64_t* slots, size_t n, const char* data) {
  if (data == nullptr) return Status::InvalidArgument("put without data (use put_hole)");
  std::vector<Item> items(n);
  for (size_t i = 0; i < n; ++i) {
    if (slots[i] >= slots_) {
      return Status::OutOfRange("slot " + std::to_string(slots[i]) + " is beyond the disk's " +
                                std::to_string(slots_) + " slots");
    }
    const char* p = data + i * params_.chunk_size;
    uint32_t want = slot_bytes(slots[i]);
    items[i] = IsAllZero(p, want)
                   ? Item{slots[i], Digest{}, nullptr, 0}
                   : Item{slots[i], Sha256Padded(p, want, params_.chunk_size), p, want};
  }
  return put_items(items.data(), n);
}

Status PointWriter::put_hole(uint64_t slot) {
  if (slot >= slots_) {
    return Status::OutOfRange("slot " + std::to_string(slot) + " is beyond the disk's " +
                              std::to_string(slots_) + " slots");
  }
  Item it{slot, Digest{}, nullptr, 0};
  return put_items(&it, 1);
}

Status PointWriter::put_known(uint64_t slot, const Digest& d) {
  if (slot >= slots_) {
    return Status::OutOfRange("slot " + std::to_string(slot) + " is beyond the disk's " +
                              std::to_string(slots_) + " slots");
  }
  Item it{slot, d, nullptr, 0};  // a zero digest: a hole
  return put_items(&it, 1);
}

Result<std::shared_ptr<const Page>> PointWriter::base_page(uint32_t level, uint64_t index) {
  if (!parent_ || level > parent_->depth) return ZeroPage();
  return base_.page(level, index);
}

Status PointWriter::put_items(const Item* items, size_t n) {
  if (n == 0) return Status::Ok();
  // Leaves touched for the first time start as the parent's leaf page.
  // Loading one may read a pack: no lock held (the parent is pinned). A leaf
  // known here stays known until commit, so `bases` has every leaf the locked
  // section below needs.
  std::vector<uint64_t> need;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.ok()) return failed_;
    if (done_) return Status::InvalidArgument("point writer is already committed or abandoned");
    for (size_t i = 0; i < n; ++i) {
      const uint64_t leaf = items[i].slot >> kFanoutShift;
      if (!resident_.count(leaf) && !spilled_.count(leaf) &&
          std::find(need.begin(), need.end(), leaf) == need.end()) {
        need.push_back(leaf);
      }
    }
  }
  std::vector<std::pair<uint64_t, std::shared_ptr<const Page>>> bases;
  for (uint64_t leaf : need) {
    auto b = base_page(1, leaf);
    if (!b.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_.ok()) failed_ = b.status();
      return b.status();
    }
    bases.emplace_back(leaf, std::move(b).value());
  }
  {
    // The index lookups under the same gc_mu_ hold as the references they
    // lead to, so a GC pass cannot drop an object between the two.
    std::shared_lock<std::shared_mutex> g(store_->gc_mu_);
    std::vector<Digest> want;
    std::vector<size_t> at;
    for (size_t i = 0; i < n; ++i) {
      if (!items[i].d.is_zero()) {
        want.push_back(items[i].d);
        at.push_back(i);
      }
    }
    uint64_t epoch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      epoch = seal_epoch_;
    }
    std::vector<std::optional<bool>> indexed(n);
    if (!want.empty()) {
      auto locs = store_->catalog_->lookup_many(want.data(), want.size());
      if (!locs.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        if (failed_.ok()) failed_ = locs.status();
        return locs.status();
      }
      for (size_t j = 0; j < want.size(); ++j) indexed[at[j]] = locs.value()[j].has_value();
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.ok()) return failed_;
    for (size_t i = 0; i < n; ++i) {
      const Item& it = items[i];
      const uint64_t leaf = it.slot >> kFanoutShift;
      if (!it.d.is_zero()) {
        Status s = store_object_locked(ObjectKind::kChunk, it.d, it.data, it.len,
                                       params_.chunk_size, indexed[i], epoch);
        // put_known of a chunk the store lacks: the caller sends the data.
        if (s.code() == Code::kNotFound && it.data == nullptr && n == 1) return s;
        if (!s.ok()) {
          failed_ = s;
          return s;
        }
      }
      Page* page;
      auto rit = resident_.find(leaf);
      if (rit != resident_.end()) {
        page = rit->second.get();
      } else {
        auto np = std::make_unique<Page>();
        if (spilled_.count(leaf)) {
          Status s = load_spilled_locked(leaf, np.get());
          if (!s.ok()) {
            failed_ = s;
            return s;
          }
          spilled_.erase(leaf);
        } else {
          auto bit = std::find_if(bases.begin(), bases.end(),
                                  [&](const auto& b) { return b.first == leaf; });
          if (bit == bases.end()) {
            failed_ = Status::Internal("point writer: leaf " + std::to_string(leaf) +
                                       " has no base page");
            return failed_;
          }
          *np = *bit->second;
        }
        page = np.get();
        resident_.emplace(leaf, std::move(np));
        Status s = evict_locked(leaf);
        if (!s.ok()) {
          failed_ = s;
          return s;
        }
      }
      page->e[it.slot & (kFanout - 1)] = it.d;
      ++put_slots_;
    }
  }
  wait_seal_room();
  return Status::Ok();
}

Status PointWriter::store_object_locked(ObjectKind kind, const Digest& d, const void* data,
                                        size_t len, size_t stored_len,
                                        const std::optional<bool>& indexed, uint64_t epoch) {
  bool known = pack_digests_.count(d) > 0;
  for (auto it = sealing_.begin(); !known && it != sealing_.end(); ++it) known = it->count(d) > 0;
  if (!known) {
    if (indexed && (*indexed || epoch == seal_epoch_)) {
      // No pack of this writer entered the index since the lookup: it still holds.
      known = *indexed;
    } else {
      STORE_ASSIGN_OR_RETURN(auto loc, store_->catalog_->lookup(d));
      known = loc.has_value();
    }
  }
  if (!known && data == nullptr) {
    return Status::NotFound("chunk " + d.hex() + " is not in this store");
  }
  if (!known) {
    if (!pack_) {
      STORE_ASSIGN_OR_RETURN(pack_, PackWriter::Create(store_->packs_dir(), store_->new_pack_id(),
                                                       store_->options().pack_buffer_bytes,
                                                       buffers_, store_->options().pack_direct_io));
    }
    STORE_ASSIGN_OR_RETURN(uint64_t off, pack_->append(kind, d, data, len, stored_len));
    (void)off;
    pack_digests_.insert(d);
    if (kind == ObjectKind::kChunk) {
      ++new_chunks_;
      new_chunk_bytes_ += stored_len;
    } else {
      ++new_pages_;
    }
    if (pack_->bytes() >= store_->options().pack_target_bytes) {
      pack_->close();  // its last buffer is written while it waits for the sealer
      sealing_.push_back(std::move(pack_digests_));
      pack_digests_ = DigestSet();
      seal_queue_.push_back(ToSeal{std::move(pack_), std::prev(sealing_.end())});
      ++sealing_busy_;
      if (!sealer_.joinable()) sealer_ = std::thread([this] { sealer_loop(); });
      seal_cv_.notify_all();
    }
  }
  // Reused or new, this writer now depends on the object: tell the GC.
  store_->note_ref_locked(&refs_, d);
  return Status::Ok();
}

void PointWriter::sealer_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    seal_cv_.wait(lock, [&] { return sealer_stop_ || !seal_queue_.empty(); });
    if (seal_queue_.empty()) return;  // stopping, nothing left
    ToSeal job = std::move(seal_queue_.front());
    seal_queue_.pop_front();
    lock.unlock();
    (void)seal_and_index(std::move(job.pack), job.it);  // records a failure in failed_
    lock.lock();
    --sealing_busy_;
    seal_cv_.notify_all();
  }
}

void PointWriter::wait_seal_room() {
  // Two full packs waiting is enough to keep the sealer busy; more would only
  // hold their memory and let the copier run ahead of the disk.
  constexpr size_t kMaxQueued = 2;
  std::unique_lock<std::mutex> lock(mu_);
  seal_cv_.wait(lock, [&] { return seal_queue_.size() < kMaxQueued || !failed_.ok(); });
}

void PointWriter::stop_sealer(bool drop) {
  std::unique_lock<std::mutex> lock(mu_);
  if (drop) {
    // Unsealed packs unlink their temp files; nothing names their objects.
    for (auto& job : seal_queue_) sealing_.erase(job.it);
    sealing_busy_ -= seal_queue_.size();
    seal_queue_.clear();
  }
  seal_cv_.wait(lock, [&] { return sealing_busy_ == 0; });
  sealer_stop_ = true;
  seal_cv_.notify_all();
  std::thread t = std::move(sealer_);
  lock.unlock();
  if (t.joinable()) t.join();
}

Status PointWriter::seal_and_index(std::unique_ptr<PackWriter> pack,
                                   std::list<DigestSet>::iterator it) {
  // Seal (fdatasync + rename) and index outside the writer's lock: put()
  // threads keep hashing and appending to the next pack meanwhile. The pack's
  // digests stay in sealing_ until the index has them, so dedup never misses.
  Status s;
  auto sealed = pack->seal();
  if (!sealed.ok()) {
    s = sealed.status();
  } else {
    auto r = store_->catalog_->add_pack(sealed.value(), nullptr);
    if (!r.ok()) s = r.status();
  }
  std::lock_guard<std::mutex> lock(mu_);
  sealing_.erase(it);
  ++seal_epoch_;
  if (!s.ok() && failed_.ok()) failed_ = s;
  seal_cv_.notify_all();
  return s;
}

Status PointWriter::seal_pack() {
  std::unique_ptr<PackWriter> to_seal;
  std::list<DigestSet>::iterator it;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.ok()) return failed_;
    if (!pack_) return Status::Ok();  // made lazily: null means nothing new since the last seal
    to_seal = std::move(pack_);
    sealing_.push_back(std::move(pack_digests_));
    pack_digests_ = DigestSet();
    it = std::prev(sealing_.end());
  }
  return seal_and_index(std::move(to_seal), it);
}

Status PointWriter::evict_locked(uint64_t keep_leaf) {
  while (resident_.size() > max_resident_) {
    auto victim = resident_.begin();
    if (victim->first == keep_leaf) ++victim;
    if (!scratch_) {
      // Unnamed, so nothing is left behind whatever happens to this process.
      scratch_.reset(::open(store_->dir().c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
      if (!scratch_) {
        std::string tmpl = store_->dir() + "/scratch.XXXXXX";
        scratch_.reset(::mkostemp(tmpl.data(), O_CLOEXEC));
        if (!scratch_) return Status::FromErrno(errno, "create scratch file in " + store_->dir());
        ::unlink(tmpl.c_str());
      }
    }
    STORE_RETURN_IF_ERROR(PwriteFull(scratch_.get(), victim->second.get(), kPageBytes,
                                     victim->first * kPageBytes, "writer scratch file"));
    spilled_.insert(victim->first);
    resident_.erase(victim);
  }
  return Status::Ok();
}

Status PointWriter::load_spilled_locked(uint64_t leaf, Page* out) {
  return PreadFull(scratch_.get(), out, kPageBytes, leaf * kPageBytes, "writer scratch file");
}

Result<Digest> PointWriter::write_page(const Page& p) {
  if (p.is_zero()) return Digest{};
  Digest d = Sha256(&p, kPageBytes);
  {
    std::shared_lock<std::shared_mutex> g(store_->gc_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    STORE_RETURN_IF_ERROR(store_object_locked(ObjectKind::kPage, d, &p, kPageBytes, kPageBytes));
  }
  wait_seal_room();
  return d;
}

Result<PointInfo> PointWriter::commit() {
  std::vector<uint64_t> leaves;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.ok()) return failed_;
    if (done_) return Status::InvalidArgument("point writer is already committed or abandoned");
    done_ = true;
    leaves.reserve(resident_.size() + spilled_.size());
    for (const auto& [leaf, page] : resident_) leaves.push_back(leaf);
    for (uint64_t leaf : spilled_) leaves.push_back(leaf);
  }
  std::sort(leaves.begin(), leaves.end());

  auto fail = [this](const Status& s) -> Status {
    stop_sealer(true);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_.ok()) failed_ = s;
      pack_.reset();  // unlinks the unsealed pack
    }
    release();
    return s;
  };

  // Level 1: the changed leaf pages themselves. No put() runs any more, so
  // the leaf maps are read without mu_ (write_page takes it for the pack).
  std::vector<std::pair<uint64_t, Digest>> changed;
  changed.reserve(leaves.size());
  Page scratch_page;
  for (uint64_t leaf : leaves) {
    const Page* p;
    auto rit = resident_.find(leaf);
    if (rit != resident_.end()) {
      p = rit->second.get();
    } else {
      Status s = load_spilled_locked(leaf, &scratch_page);
      if (!s.ok()) return fail(s);
      p = &scratch_page;
    }
    auto d = write_page(*p);
    if (!d.ok()) return fail(d.status());
    changed.emplace_back(leaf, d.value());
    if (rit != resident_.end()) rit->second.reset();
  }
  resident_.clear();
  spilled_.clear();
  scratch_.reset();

  // Upper levels: each changed node's parent page starts as the parent
  // point's page at the same place and gets the new child digests. Nodes no
  // change reached are never read or written: they stay shared.
  const bool grew = parent_ && depth_ > parent_->depth;
  for (uint32_t level = 1; level < depth_; ++level) {
    if (grew && level == parent_->depth && (changed.empty() || changed.front().first != 0)) {
      // The disk outgrew the parent's tree: its old root becomes the first
      // child at its level, and the new levels above it are written.
      changed.insert(changed.begin(), {0, parent_->root});
    }
    std::vector<std::pair<uint64_t, Digest>> up;
    size_t i = 0;
    while (i < changed.size()) {
      uint64_t pidx = changed[i].first >> kFanoutShift;
      auto base = base_page(level + 1, pidx);
      if (!base.ok()) return fail(base.status());
      Page p = *base.value();
      for (; i < changed.size() && (changed[i].first >> kFanoutShift) == pidx; ++i) {
        p.e[changed[i].first & (kFanout - 1)] = changed[i].second;
      }
      auto d = write_page(p);
      if (!d.ok()) return fail(d.status());
      up.emplace_back(pidx, d.value());
    }
    changed.swap(up);
  }
  Digest root;
  if (!changed.empty()) {
    root = changed.front().second;
  } else if (parent_) {
    root = parent_->root;  // nothing changed, same size class: same tree
  }

  // Every earlier pack is durable and indexed before the last one goes in
  // with the record: the record may only name indexed objects.
  stop_sealer(false);
  // The last pack holds the top pages; sealing it and indexing its objects in
  // the same transaction as the point record is what makes the point exist.
  std::unique_ptr<PackWriter> last;
  Status sealed_ok;
  {
    std::lock_guard<std::mutex> lock(mu_);
    sealed_ok = failed_;  // a pack the sealer could not make durable or index
    last = std::move(pack_);
  }
  if (!sealed_ok.ok()) return fail(sealed_ok);
  SealedPack sealed;
  if (last) {
    auto r = last->seal();
    if (!r.ok()) return fail(r.status());
    sealed = std::move(r).value();
  }
  PointRecord rec;
  rec.root = root;
  rec.size = params_.size;
  rec.chunk_size = params_.chunk_size;
  rec.fanout = kFanout;
  rec.depth = depth_;
  rec.parent = parent_ ? parent_->id : 0;
  rec.created_ns = NowNs();
  rec.tag = params_.tag;
  rec.new_chunks = new_chunks_;
  rec.new_chunk_bytes = new_chunk_bytes_;
  rec.new_pages = new_pages_;
  rec.put_slots = put_slots_;
  // The point file makes the record recoverable from the region's files
  // alone (rebuild.h). Written after the last pack is durable and before the
  // transaction: a crash in between leaves a complete point that the next
  // Open imports, never a record without its file.
  rec.id = store_->new_point_id();
  Status pf = store_->write_point_file(rec);
  if (!pf.ok()) return fail(pf);
  auto id = store_->catalog_->add_pack(sealed, &rec);
  if (!id.ok()) {
    (void)RemoveFileDurable(PointsDir(store_->dir()), PointFileName(rec.id));
    return fail(id.status());
  }
  // The record is durable and names everything this writer referenced: the
  // writer's pins can go.
  release();
  return rec;
}

void PointWriter::abandon() {
  stop_sealer(true);
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    pack_.reset();
    resident_.clear();
    spilled_.clear();
    scratch_.reset();
  }
  release();
}

void PointWriter::release() {
  std::lock_guard<std::mutex> lock(mu_);
  if (registered_) {
    store_->unregister_writer(&refs_);
    if (parent_) store_->unpin(parent_->root, parent_->depth);
    registered_ = false;
    std::vector<uint64_t>().swap(refs_.prefixes);
  }
}

}  // namespace rpoint::store
