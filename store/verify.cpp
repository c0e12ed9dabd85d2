// Store::verify: re-read and re-hash everything one disk point references.
//
// Pages are read straight from their packs (never from the page cache: the
// point is to check the bytes on disk) and walked in slot order. Chunks are
// gathered in batches, deduplicated, sorted by pack and offset so each pack is
// read front to back, then re-hashed. Damage is reported per object with the
// slots it affects, so a restore can name exactly what is lost.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <functional>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "store/file_util.h"
#include "store/macros.h"
#include "store/pack.h"
#include "store/point_reader.h"
#include "store/store.h"

namespace rpoint::store {
namespace {

constexpr size_t kChunkBatch = 16384;  // slots gathered before reading chunks
constexpr size_t kMaxListedSlots = 64;
constexpr size_t kMaxRememberedGood = 1u << 20;

}  // namespace

Result<VerifyReport> Store::verify(PointId id, const VerifyOptions& o) {
  // Pack files gone from the disk are reported as such even while a
  // descriptor opened before still reads them.
  STORE_ASSIGN_OR_RETURN(auto lost, find_lost_packs());
  STORE_ASSIGN_OR_RETURN(auto reader, open_point(id));  // pins the root meanwhile
  const PointInfo& info = reader->info();
  const uint64_t slots = reader->slots();
  VerifyReport rep;
  rep.id = id;

  std::unordered_map<Digest, size_t, DigestHash> bad_chunk;  // -> index in rep.damage
  std::unordered_set<Digest, DigestHash> good;
  std::vector<std::pair<Digest, ObjectLoc>> to_quarantine;
  std::vector<char> buf;
  std::unordered_set<uint64_t> packs_used;

  auto add_slot = [&](Damage& dmg, uint64_t slot) {
    if (dmg.slot_count == 0) dmg.first_slot = slot;
    dmg.first_slot = std::min(dmg.first_slot, slot);
    ++dmg.slot_count;
    if (dmg.slots.size() < kMaxListedSlots) dmg.slots.push_back(slot);
  };

  // Reads one object as stored and checks its name; "" when it is sound.
  auto check_object = [&](const Digest& d, uint32_t expect_len, ObjectLoc* loc_out) -> std::string {
    auto where = locate(d);
    if (!where.ok()) {
      if (where.status().code() == Code::kNotFound) return "pack file missing";
      return where.status().message();
    }
    if (!where.value()) return "not in the chunk index";
    const auto& [loc, fd] = *where.value();
    *loc_out = loc;
    packs_used.insert(loc.pack);
    if (expect_len != 0 && loc.length != expect_len) {
      return "indexed with length " + std::to_string(loc.length) + ", expected " +
             std::to_string(expect_len);
    }
    buf.resize(loc.length);
    Status s = PreadFull(fd->fd.get(), buf.data(), loc.length, loc.offset,
                         "pack " + std::to_string(loc.pack));
    if (!s.ok()) return s.message();
    rep.bytes_read += loc.length;
    if (Sha256(buf.data(), loc.length) != d) return "checksum mismatch";
    return "";
  };

  std::vector<std::pair<Digest, uint64_t>> batch;  // (chunk digest, slot)
  auto check_chunks = [&]() {
    // Distinct digests, with the slots that name them.
    std::map<Digest, std::vector<uint64_t>> by_digest;
    for (const auto& [d, slot] : batch) {
      auto bad = bad_chunk.find(d);
      if (bad != bad_chunk.end()) {
        add_slot(rep.damage[bad->second], slot);
        continue;
      }
      if (good.count(d)) continue;
      by_digest[d].push_back(slot);
    }
    batch.clear();
    // Read in pack order: sequential I/O within each pack.
    struct Item {
      ObjectLoc loc;
      bool located;
      const Digest* d;
      std::vector<uint64_t>* slots;
    };
    std::vector<Item> items;
    for (auto& [d, sl] : by_digest) {
      auto where = catalog_->lookup(d);
      Item it{{}, where.ok() && where.value().has_value(), &d, &sl};
      if (it.located) it.loc = *where.value();
      items.push_back(it);
    }
    std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
      return std::tie(a.loc.pack, a.loc.offset) < std::tie(b.loc.pack, b.loc.offset);
    });
    for (Item& it : items) {
      ObjectLoc loc;
      std::string why = check_object(*it.d, info.chunk_size, &loc);
      ++rep.chunks_checked;
      if (why.empty()) {
        if (good.size() >= kMaxRememberedGood) good.clear();
        good.insert(*it.d);
        continue;
      }
      Damage dmg;
      dmg.kind = Damage::Kind::kChunk;
      dmg.digest = *it.d;
      dmg.pack = loc.pack;
      dmg.offset = loc.offset;
      dmg.reason = why;
      for (uint64_t s : *it.slots) add_slot(dmg, s);
      if (why == "checksum mismatch") to_quarantine.emplace_back(*it.d, loc);
      bad_chunk[*it.d] = rep.damage.size();
      rep.damage.push_back(std::move(dmg));
    }
  };

  // Depth-first in slot order. A damaged page hides everything below it:
  // report the slot range it maps and do not descend.
  std::function<void(uint32_t, uint64_t, const Digest&)> walk = [&](uint32_t level, uint64_t index,
                                                                    const Digest& d) {
    if (d.is_zero()) return;
    ObjectLoc loc;
    std::string why = check_object(d, kPageBytes, &loc);
    if (!why.empty()) {
      Damage dmg;
      dmg.kind = Damage::Kind::kPage;
      dmg.digest = d;
      dmg.pack = loc.pack;
      dmg.offset = loc.offset;
      dmg.reason = why;
      dmg.level = level;
      uint64_t span = uint64_t(1) << (kFanoutShift * level);
      dmg.first_slot = index * span;
      dmg.slot_count = dmg.first_slot < slots ? std::min(span, slots - dmg.first_slot) : 0;
      if (why == "checksum mismatch") to_quarantine.emplace_back(d, loc);
      rep.damage.push_back(std::move(dmg));
      return;
    }
    ++rep.pages_checked;
    Page page;
    std::memcpy(&page, buf.data(), kPageBytes);
    for (uint32_t i = 0; i < kFanout; ++i) {
      const Digest& e = page.e[i];
      if (e.is_zero()) continue;
      uint64_t child = index * kFanout + i;
      if (level == 1) {
        batch.emplace_back(e, child);
        if (batch.size() >= kChunkBatch) check_chunks();
      } else {
        walk(level - 1, child, e);
      }
    }
  };
  walk(info.depth, 0, info.root);
  check_chunks();

  // The framing of every pack the point uses: header, footer, trailer checksum
  // (what an index rebuild would rely on).
  std::vector<uint64_t> used(packs_used.begin(), packs_used.end());
  std::sort(used.begin(), used.end());
  for (uint64_t pack : used) {
    std::shared_ptr<PackFd> fd;
    {
      std::shared_lock<std::shared_mutex> g(gc_mu_);
      auto r = pack_fd_locked(pack);
      if (r.ok()) fd = std::move(r).value();
    }
    if (!fd) continue;  // already reported per object as "pack file missing"
    ++rep.packs_checked;
    auto t = ReadPackTrailer(fd->fd.get(), pack);
    if (!t.ok()) rep.pack_problems.push_back(PackProblem{pack, t.status().message()});
  }

  std::vector<uint64_t> packs;
  for (const Damage& d : rep.damage) {
    if (d.pack != 0) packs.push_back(d.pack);
  }
  for (const PackProblem& p : rep.pack_problems) packs.push_back(p.pack);
  std::sort(packs.begin(), packs.end());
  packs.erase(std::unique(packs.begin(), packs.end()), packs.end());
  rep.damaged_packs = std::move(packs);

  if (!rep.ok()) {
    spdlog::error("store {}: point {} has {} damaged object(s), {} damaged pack(s)", opts_.dir, id,
                  rep.damage.size(), rep.damaged_packs.size());
  }
  if (o.quarantine && !to_quarantine.empty()) {
    std::lock_guard<std::mutex> run(gc_run_mu_);
    std::unique_lock<std::shared_mutex> g(gc_mu_);
    STORE_RETURN_IF_ERROR(catalog_->quarantine(to_quarantine, "verify: checksum mismatch"));
    for (const auto& [d, loc] : to_quarantine) pages_.erase(d);
  }
  // Objects of a pack file gone or cut short are quarantined as a whole pack
  // (every point naming them heals at its disk's next point).
  if (o.quarantine) STORE_RETURN_IF_ERROR(quarantine_packs(lost).status());
  return rep;
}

}  // namespace rpoint::store
