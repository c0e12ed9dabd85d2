// Store::collect_garbage and pack rewriting. The scheme (why it is safe while
// writers and readers run) is described in store.h and docs/store.md.
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <unordered_map>
#include <unordered_set>

#include "store/file_util.h"
#include "store/macros.h"
#include "store/pack.h"
#include "store/store.h"

namespace rpoint::store {
namespace {

constexpr size_t kDeleteBatch = 2048;
constexpr int64_t kNoBound = INT64_MAX;
// Points written before packs took their point's created_ns (no pack has
// exactly the point's time) indexed their last pack a moment after the
// record's time: their bound gets this margin.
constexpr int64_t kOldFormatSlack = 60'000'000'000;

struct PageKey {
  Digest d;
  uint32_t level;
  bool operator==(const PageKey&) const = default;
};
struct PageKeyHash {
  size_t operator()(const PageKey& k) const { return size_t(k.d.prefix()) ^ k.level; }
};

}  // namespace

Result<GcStats> Store::collect_garbage(const GcOptions& o) {
  std::lock_guard<std::mutex> run(gc_run_mu_);
  auto t0 = std::chrono::steady_clock::now();
  GcStats st;

  // a. Snapshot what is live right now, and start collecting late references.
  // bound: no object below this root is in a pack indexed after it (its
  // point's created_ns, see PackRow::created_ns); unknown for a pinned root
  // whose record is gone.
  struct Root {
    Digest d;
    uint32_t depth;
    int64_t bound;
  };
  std::vector<Root> roots;
  std::vector<uint64_t> marks;
  std::vector<PackRow> packs_at_start;
  {
    // One instant for all three: a committing writer inserts its point record
    // and only then drops its refs and its parent's pin (reg_mu_). Reading
    // the records before taking reg_mu_ let a commit land in between, and the
    // new point was then in none of the three: its objects and everything it
    // inherits were swept as garbage (issue #7, defect 4).
    std::unique_lock<std::shared_mutex> g(gc_mu_);
    std::lock_guard<std::mutex> lock(reg_mu_);
    STORE_ASSIGN_OR_RETURN(auto pts, catalog_->list_points());
    STORE_ASSIGN_OR_RETURN(packs_at_start, catalog_->packs());
    std::unordered_set<int64_t> pack_times;
    for (const PackRow& p : packs_at_start) pack_times.insert(p.created_ns);
    for (const PointRecord& p : pts) {
      int64_t bound =
          pack_times.count(p.created_ns) ? p.created_ns : p.created_ns + kOldFormatSlack;
      roots.push_back({p.root, p.depth, bound});
    }
    for (const auto& [k, n] : pins_) roots.push_back({k.root, k.depth, kNoBound});
    for (WriterRefs* w : writers_) {
      marks.insert(marks.end(), w->prefixes.begin(), w->prefixes.end());
    }
    gc_active_ = true;
    late_refs_.clear();
  }
  struct EndGc {
    Store* s;
    ~EndGc() {
      std::unique_lock<std::shared_mutex> g(s->gc_mu_);
      std::lock_guard<std::mutex> lock(s->reg_mu_);
      s->gc_active_ = false;
      s->late_refs_.clear();
    }
  } end_gc{this};
  st.roots = roots.size();
  for (const PackRow& p : packs_at_start) st.pack_bytes_before += p.bytes;

  // b. Mark: every page once per (digest, level); shared subtrees are skipped.
  // A page that cannot be read hides what lies below it. Those objects are
  // unknown, but none of them is in a pack indexed after the root the page
  // was reached from (see Root::bound): candidates in packs indexed no later
  // than that are kept, every other candidate goes as usual. So a damaged
  // point only holds back garbage as old as itself.
  std::unordered_set<PageKey, PageKeyHash> visited;
  struct Todo {
    PageKey k;
    int64_t bound;
  };
  std::vector<Todo> stack;
  for (const Root& r : roots) {
    if (!r.d.is_zero() && visited.insert({r.d, r.depth}).second) {
      stack.push_back({{r.d, r.depth}, r.bound});
    }
  }
  bool unreadable = false;
  int64_t keep_until = 0;  // candidates in packs indexed up to this are kept
  while (!stack.empty()) {
    auto [k, bound] = stack.back();
    stack.pop_back();
    std::shared_ptr<const Page> page = pages_.get(k.d);  // use, but do not fill, the cache
    if (!page) {
      auto r = read_page_uncached(k.d);
      if (!r.ok()) {
        ++st.pages_unreadable;
        keep_until = unreadable ? std::max(keep_until, bound) : bound;
        unreadable = true;
        spdlog::error("store {}: GC: {}; keeping what may lie below it (run verify)", opts_.dir,
                      r.status().message());
        marks.push_back(k.d.prefix());  // and the page itself, should it be healed
        continue;
      }
      page = std::move(r).value();
    }
    ++st.pages_walked;
    marks.push_back(k.d.prefix());
    for (const Digest& e : page->e) {
      if (e.is_zero()) continue;
      if (k.level == 1) {
        marks.push_back(e.prefix());
      } else if (visited.insert({e, k.level - 1}).second) {
        stack.push_back({{e, k.level - 1}, bound});
      }
    }
  }
  std::unordered_set<PageKey, PageKeyHash>().swap(visited);
  std::sort(marks.begin(), marks.end());
  marks.erase(std::unique(marks.begin(), marks.end()), marks.end());

  // c. Scan the index: unmarked objects are candidates.
  std::vector<std::pair<Digest, ObjectLoc>> cands;
  std::unordered_map<uint64_t, uint64_t> live_bytes;
  std::unordered_set<uint64_t> held_packs;  // may hold objects below an unreadable page
  if (unreadable) {
    for (const PackRow& p : packs_at_start) {
      if (p.created_ns <= keep_until) held_packs.insert(p.id);
    }
  }
  STORE_RETURN_IF_ERROR(catalog_->for_each_object([&](const Digest& d, const ObjectLoc& loc) {
    ++st.objects_scanned;
    // A pack not in packs_at_start is newer than every root: never held.
    bool marked = std::binary_search(marks.begin(), marks.end(), d.prefix());
    bool held = !marked && !held_packs.empty() && held_packs.count(loc.pack);
    if (held) ++st.objects_kept_unknown;
    if (marked || held) {
      live_bytes[loc.pack] += loc.length;
    } else {
      cands.emplace_back(d, loc);
    }
  }));
  std::vector<uint64_t>().swap(marks);
  if (o.before_sweep) o.before_sweep();

  // d. Delete in batches, each atomic against writers' "exists, reuse it".
  for (size_t i = 0; i < cands.size(); i += kDeleteBatch) {
    std::vector<Digest> batch;
    std::unique_lock<std::shared_mutex> g(gc_mu_);
    {
      std::lock_guard<std::mutex> lock(reg_mu_);
      for (size_t j = i; j < std::min(cands.size(), i + kDeleteBatch); ++j) {
        const auto& [d, loc] = cands[j];
        if (late_refs_.count(d.prefix())) {
          ++st.objects_kept_late;
          live_bytes[loc.pack] += loc.length;
        } else {
          batch.push_back(d);
        }
      }
    }
    if (o.dry_run) {
      st.objects_deleted += batch.size();
      continue;
    }
    STORE_ASSIGN_OR_RETURN(uint64_t n, catalog_->delete_objects(batch));
    st.objects_deleted += n;
  }
  std::vector<std::pair<Digest, ObjectLoc>>().swap(cands);

  // e. Packs: drop empty ones, rewrite mostly dead ones. Only packs that
  // existed at the snapshot: newer ones belong to running writers.
  if (!o.dry_run) {
    std::unordered_set<std::string> dirty_dirs;
    for (const PackRow& p : packs_at_start) {
      uint64_t live = live_bytes.count(p.id) ? live_bytes[p.id] : 0;
      uint64_t payload = p.bytes > kPackHeaderBytes ? p.bytes - kPackHeaderBytes : 0;
      if (live == 0) {
        std::unique_lock<std::shared_mutex> g(gc_mu_);
        STORE_ASSIGN_OR_RETURN(bool gone, catalog_->delete_pack_if_empty(p.id));
        if (gone) {
          drop_pack_fd_locked(p.id);
          std::string path = PackPath(packs_dir_, p.id);
          if (::unlink(path.c_str()) != 0) {
            spdlog::warn("store {}: unlink {}: {}", opts_.dir, path, std::strerror(errno));
          }
          dirty_dirs.insert(PackSubdir(packs_dir_, p.id));
          ++st.packs_deleted;
        }
      } else if (double(live) < opts_.repack_below_live * double(payload)) {
        Status s = repack(p.id, &st);
        if (!s.ok()) spdlog::warn("store {}: repack of pack {}: {}", opts_.dir, p.id, s.ToString());
      }
    }
    for (const std::string& d : dirty_dirs) STORE_RETURN_IF_ERROR(FsyncDir(d));
  }

  STORE_ASSIGN_OR_RETURN(auto after, catalog_->packs());
  for (const PackRow& p : after) st.pack_bytes_after += p.bytes;
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  spdlog::info(
      "store {}: GC {} roots, {} pages walked ({} unreadable), {} objects scanned, {} deleted "
      "({} kept for running writers, {} kept as possibly below unreadable pages), {} packs "
      "deleted, {} rewritten, pack bytes {} -> {} in {:.3f}s",
      opts_.dir, st.roots, st.pages_walked, st.pages_unreadable, st.objects_scanned,
      st.objects_deleted, st.objects_kept_late, st.objects_kept_unknown, st.packs_deleted,
      st.packs_repacked, st.pack_bytes_before, st.pack_bytes_after, st.seconds);
  return st;
}

// Copies a pack's live objects into a new pack, re-checking each on the way
// (a damaged object is never copied: the old pack stays for verify to report),
// then moves their index rows in one transaction and deletes the old file.
Status Store::repack(uint64_t pack, GcStats* stats) {
  STORE_ASSIGN_OR_RETURN(auto entries, catalog_->objects_in_pack(pack));
  std::shared_ptr<PackFd> fd;
  {
    std::shared_lock<std::shared_mutex> g(gc_mu_);
    STORE_ASSIGN_OR_RETURN(fd, pack_fd_locked(pack));
  }
  STORE_ASSIGN_OR_RETURN(
      auto w, PackWriter::Create(packs_dir_, new_pack_id(), opts_.pack_buffer_bytes, nullptr,
                                 opts_.pack_direct_io));
  std::vector<char> buf;
  for (const PackEntry& e : entries) {
    buf.resize(e.length);
    STORE_RETURN_IF_ERROR(
        PreadFull(fd->fd.get(), buf.data(), e.length, e.offset, "pack " + std::to_string(pack)));
    if (Sha256(buf.data(), e.length) != e.digest) {
      return Status::IoError("object " + e.digest.short_hex() + " at " + std::to_string(e.offset) +
                             " fails its checksum; pack left as is");
    }
    STORE_RETURN_IF_ERROR(
        w->append(ObjectKind(e.kind), e.digest, buf.data(), e.length, e.length).status());
  }
  STORE_ASSIGN_OR_RETURN(auto sealed, w->seal());
  Status s;
  {
    std::unique_lock<std::shared_mutex> g(gc_mu_);
    s = catalog_->replace_pack(pack, sealed);
    if (s.ok()) drop_pack_fd_locked(pack);
  }
  if (!s.ok()) {
    ::unlink(PackPath(packs_dir_, sealed.id).c_str());
    return s;
  }
  ::unlink(PackPath(packs_dir_, pack).c_str());
  STORE_RETURN_IF_ERROR(FsyncDir(PackSubdir(packs_dir_, pack)));
  ++stats->packs_repacked;
  return Status::Ok();
}

}  // namespace rpoint::store
