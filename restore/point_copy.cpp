#include "restore/point_copy.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/fault_injection.h"
#include "store/digest.h"
#include "store/format.h"

namespace rpoint {

Result<std::unique_ptr<StoreChunkTarget>> StoreChunkTarget::Begin(
    std::shared_ptr<store::Store> st, const store::PointParams& params) {
  auto w = st->begin_point(params);
  if (!w.ok()) return w.status();
  return std::unique_ptr<StoreChunkTarget>(
      new StoreChunkTarget(std::move(st), std::move(w).value()));
}

Result<std::vector<bool>> StoreChunkTarget::has(const std::vector<store::Digest>& chunks) {
  return store_->has_objects(chunks);
}

Status StoreChunkTarget::reuse(uint64_t slot, const store::Digest& d) {
  return writer_->put_known(slot, d);
}

Status StoreChunkTarget::put(uint64_t slot, const store::Digest& d, const void* data, size_t len) {
  // The receiving side's own check: what arrives must be what the source
  // tree names (a remote target does the same on its host).
  store::Digest got = store::Sha256Padded(data, len, writer_->chunk_size());
  if (got != d) {
    return Status::IoError("chunk of slot " + std::to_string(slot) + " arrived damaged: SHA-256 " +
                           got.hex() + ", expected " + d.hex());
  }
  return writer_->put(slot, data, len);
}

Result<store::PointInfo> StoreChunkTarget::commit() {
  return writer_->commit();
}

void StoreChunkTarget::abandon() {
  writer_->abandon();
}

Result<store::PointInfo> CopyDiskPoint(store::PointReader& src, ChunkTarget& dst,
                                       CopyProgress& progress, const std::function<bool()>& stop) {
  const uint64_t slots = src.slots();
  const uint32_t cs = src.chunk_size();
  const uint64_t size = src.size();
  auto fail = [&](Status s) -> Result<store::PointInfo> {
    dst.abandon();
    return s;
  };
  // The work to do, for progress: the source's data slots (from the tree
  // alone; hole subtrees are skipped whole).
  auto ext = src.extents(0, size);
  if (!ext.ok()) return fail(ext.status());
  uint64_t total = 0, off = 0;
  for (const Extent& e : ext.value()) {
    if (!(e.flags & Extent::kHole)) total += (off + e.length + cs - 1) / cs - off / cs;
    off += e.length;
  }
  progress.slots_total.store(total);

  std::vector<char> buf(cs);
  for (uint64_t first = 0; first < slots; first += store::kFanout) {
    uint32_t count = static_cast<uint32_t>(std::min<uint64_t>(store::kFanout, slots - first));
    auto locs = src.resolve(first, count);
    if (!locs.ok()) return fail(locs.status());
    std::vector<uint64_t> data_slots;
    std::vector<store::Digest> digests;
    for (uint32_t i = 0; i < count; ++i) {
      const auto& l = locs.value()[i];
      if (l.state == store::PointReader::Location::kHole) continue;
      data_slots.push_back(first + i);
      digests.push_back(l.digest);
    }
    if (data_slots.empty()) continue;
    auto held = dst.has(digests);
    if (!held.ok()) return fail(held.status());
    for (size_t k = 0; k < data_slots.size(); ++k) {
      if (stop()) return fail(Status::Shutdown("daemon stopping"));
      uint64_t slot = data_slots[k];
      if (held.value()[k]) {
        Status s = dst.reuse(slot, digests[k]);
        if (s.ok()) {
          progress.chunks_reused.fetch_add(1);
          progress.slots_done.fetch_add(1);
          continue;
        }
        if (s.code() != Code::kNotFound) return fail(s);
        // Collected meanwhile: move it after all.
      }
      fault::Action a = fault::Hit("copy.chunk");
      if (a.error) {
        return fail(Status::FromErrno(a.error, "copying chunk of slot " + std::to_string(slot)));
      }
      uint64_t len = std::min<uint64_t>(cs, size - slot * cs);
      // PointReader re-hashes the whole chunk: a damaged or missing one fails
      // here (and is quarantined), naming the disk range.
      Status s = src.read(slot * cs, len, buf.data());
      if (s.ok()) s = dst.put(slot, digests[k], buf.data(), len);
      if (!s.ok()) return fail(s);
      progress.chunks_moved.fetch_add(1);
      progress.bytes_moved.fetch_add(len);
      progress.slots_done.fetch_add(1);
    }
  }
  return dst.commit();
}

}  // namespace rpoint
