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

Status StoreChunkTarget::put_hole(uint64_t slot) {
  return writer_->put_hole(slot);
}

Status StoreChunkTarget::checkpoint() {
  return writer_->seal_pack();
}

Result<store::PointInfo> StoreChunkTarget::commit() {
  return writer_->commit();
}

void StoreChunkTarget::abandon() {
  writer_->abandon();
}

uint64_t AddSlotRun(std::vector<std::pair<uint64_t, uint64_t>>* runs, uint64_t offset,
                    uint64_t length, uint32_t chunk_size) {
  uint64_t a = offset / chunk_size, b = (offset + length + chunk_size - 1) / chunk_size;
  if (!runs->empty() && runs->back().second > a) a = runs->back().second;  // a shared last slot
  if (a >= b) return 0;
  if (!runs->empty() && runs->back().second == a) {
    runs->back().second = b;
  } else {
    runs->emplace_back(a, b);
  }
  return b - a;
}

Result<store::PointInfo> CopyDiskPoint(store::PointReader& src, ChunkTarget& dst,
                                       CopyProgress& progress, const std::function<bool()>& stop,
                                       const CopyOptions& opts) {
  const uint32_t cs = src.chunk_size();
  const uint64_t size = src.size();
  auto fail = [&](Status s) -> Result<store::PointInfo> {
    dst.abandon();
    return s;
  };
  // The slot runs to visit, from the trees alone: the source's data (hole
  // subtrees skipped whole) or, with a base, what differs from it (equal
  // subtrees skipped whole). Their size is the work, for progress.
  auto ext = opts.base ? src.changed_extents(*opts.base, 0, size) : src.extents(0, size);
  if (!ext.ok()) return fail(ext.status());
  std::vector<std::pair<uint64_t, uint64_t>> runs;  // [first slot, end slot)
  uint64_t total = 0, off = 0;
  for (const Extent& e : ext.value()) {
    bool visit = opts.base ? (e.flags & MetaContext::kDirty) != 0 : !(e.flags & Extent::kHole);
    if (visit) total += AddSlotRun(&runs, off, e.length, cs);
    off += e.length;
  }
  progress.slots_total.store(total);

  std::vector<char> buf(cs);
  uint64_t since_checkpoint = 0;
  for (const auto& [run_first, run_end] : runs) {
    for (uint64_t first = run_first; first < run_end;) {
      // resolve() takes slots of one leaf page.
      uint64_t leaf_end = (first / store::kFanout + 1) * store::kFanout;
      uint32_t count = static_cast<uint32_t>(std::min(leaf_end, run_end) - first);
      auto locs = src.resolve(first, count);
      if (!locs.ok()) return fail(locs.status());
      std::vector<uint64_t> data_slots;
      std::vector<store::Digest> digests;
      for (uint32_t i = 0; i < count; ++i) {
        const auto& l = locs.value()[i];
        if (l.state == store::PointReader::Location::kHole) {
          if (opts.base) {
            // Data in the base, a hole in the source.
            Status s = dst.put_hole(first + i);
            if (!s.ok()) return fail(s);
            progress.slots_done.fetch_add(1);
          }
          continue;
        }
        data_slots.push_back(first + i);
        digests.push_back(l.digest);
      }
      first += count;
      if (data_slots.empty()) continue;
      progress.chunks_looked_up.fetch_add(digests.size());
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
        since_checkpoint += len;
        if (opts.checkpoint_bytes && since_checkpoint >= opts.checkpoint_bytes) {
          // Durable before it is reported: a caller's record of progress
          // never counts chunks a crash would lose.
          s = dst.checkpoint();
          if (!s.ok()) return fail(s);
          since_checkpoint = 0;
          progress.checkpoints.fetch_add(1);
          if (opts.on_checkpoint) opts.on_checkpoint();
        }
      }
    }
  }
  return dst.commit();
}

}  // namespace rpoint
