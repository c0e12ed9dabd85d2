#include "store/store.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <filesystem>
#include <functional>

#include "common/thread_role.h"
#include "store/file_util.h"
#include "store/macros.h"
#include "store/point_reader.h"
#include "store/point_writer.h"
#include "store/rebuild.h"
#include "store/tree.h"

namespace rpoint::store {
Store::Store(StoreOptions opts)
    : opts_(std::move(opts)),
      packs_dir_(opts_.dir + "/packs"),
      points_dir_(PointsDir(opts_.dir)),
      pages_(std::max<size_t>(opts_.page_cache_bytes / kPageBytes, 16)),
      pack_cache_(opts_.pack_cache ? opts_.pack_cache : PackCache::Create(opts_.open_packs)),
      pack_owner_(pack_cache_->new_owner()) {}

// Handles still held elsewhere keep their files open; the cache forgets ours.
Store::~Store() {
  pack_cache_->drop_owner(pack_owner_);
}

Result<std::shared_ptr<Store>> Store::Open(const StoreOptions& opts) {
  static_assert(std::endian::native == std::endian::little, "on-disk format is little-endian");
  if (opts.dir.empty()) return Status::InvalidArgument("store: empty region directory");
  if (opts.pack_target_bytes < (1u << 20)) {
    return Status::InvalidArgument("store: pack_target_bytes below 1 MiB");
  }
  std::shared_ptr<Store> s(new Store(opts));
  bool created = false, packs_created = false, points_created = false, man_created = false;
  STORE_RETURN_IF_ERROR(MakeDirs(opts.dir, kRegionDirMode, &created));
  STORE_RETURN_IF_ERROR(MakeDirs(s->packs_dir_, kRegionDirMode, &packs_created));
  STORE_RETURN_IF_ERROR(MakeDirs(s->points_dir_, kRegionDirMode, &points_created));
  STORE_RETURN_IF_ERROR(MakeDirs(opts.dir + "/manifests", kRegionDirMode, &man_created));
  if (packs_created || points_created || man_created) STORE_RETURN_IF_ERROR(FsyncDir(opts.dir));
  if (created) {
    std::string parent = std::filesystem::path(opts.dir).parent_path().string();
    STORE_RETURN_IF_ERROR(FsyncDir(parent.empty() ? "." : parent));
  }

  std::string lock_path = opts.dir + "/LOCK";
  s->lock_fd_.reset(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640));
  if (!s->lock_fd_) return Status::FromErrno(errno, "open " + lock_path);
  if (::flock(s->lock_fd_.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) return Status::Conflict("store " + opts.dir + " is open elsewhere");
    return Status::FromErrno(errno, "flock " + lock_path);
  }

  // A damaged store.db stops the open (nothing is guessed from it); the
  // message says how to have it rebuilt, which loses no point.
  const std::string db_path = opts.dir + "/store.db";
  auto damaged = [&](const Status& st) {
    if (st.code() != Code::kCorruption) return st;
    return Status(st.code(), st.message() + "; to rebuild it, stop the daemon and move " + db_path +
                                 " (and its -wal and -shm files) aside: the next start indexes "
                                 "the packs and point files again (the quarantine list is lost: "
                                 "verify the points to find damage again)");
  };
  auto catalog = Catalog::Open(db_path);
  if (!catalog.ok()) return damaged(catalog.status());
  s->catalog_ = std::move(catalog).value();
  // A missing or empty store.db is rebuilt here from the packs' trailers and
  // the point files; a crash's leftovers are reconciled the same way.
  RepairReport rep;
  if (Status r = s->reconcile(true, &rep); !r.ok()) return damaged(r);
  return s;
}

Status Store::check_present() const {
  struct stat held {
  }, now{};
  std::string lock_path = opts_.dir + "/LOCK";
  bool same = ::fstat(lock_fd_.get(), &held) == 0 && ::stat(lock_path.c_str(), &now) == 0 &&
              held.st_dev == now.st_dev && held.st_ino == now.st_ino;
  if (same) return Status::Ok();
  return Status::Unavailable("its directory " + opts_.dir +
                             " was removed or replaced while rpointd ran (" + lock_path +
                             " is not the file opened at start)");
}

bool Store::Exists(const std::string& dir) {
  for (const char* f : {"/store.db", "/LOCK", "/packs", "/points", "/manifests"}) {
    struct stat st {};
    if (::lstat((dir + f).c_str(), &st) == 0) return true;
  }
  return false;
}

Result<std::shared_ptr<PackFd>> Store::pack_fd_locked(uint64_t pack) {
  return pack_cache_->get(pack_owner_, pack, PackPath(packs_dir_, pack));
}

void Store::drop_pack_fd_locked(uint64_t pack) {
  pack_cache_->drop(pack_owner_, pack);
}

Result<std::optional<std::pair<ObjectLoc, std::shared_ptr<PackFd>>>> Store::locate(
    const Digest& d) {
  using Out = std::optional<std::pair<ObjectLoc, std::shared_ptr<PackFd>>>;
  std::shared_lock<std::shared_mutex> g(gc_mu_);
  STORE_ASSIGN_OR_RETURN(auto loc, catalog_->lookup(d));
  if (!loc) return Out();
  STORE_ASSIGN_OR_RETURN(auto fd, pack_fd_locked(loc->pack));
  return Out(std::make_pair(*loc, std::move(fd)));
}

Result<std::shared_ptr<const Page>> Store::read_page_uncached(const Digest& d) {
  STORE_ASSIGN_OR_RETURN(auto where, locate(d));
  if (!where) return Status::IoError("tree page " + d.short_hex() + " is not in the index");
  const auto& [loc, fd] = *where;
  return read_page_at(d, loc, *fd);
}

Result<std::shared_ptr<const Page>> Store::read_page_at(const Digest& d, const ObjectLoc& loc,
                                                        const PackFd& fd) {
  if (loc.length != kPageBytes) {
    return Status::IoError("tree page " + d.short_hex() + " has length " +
                           std::to_string(loc.length));
  }
  auto page = std::make_shared<Page>();
  STORE_RETURN_IF_ERROR(PreadFull(fd.fd.get(), page.get(), kPageBytes, loc.offset,
                                  "pack " + std::to_string(loc.pack)));
  if (Sha256(page.get(), kPageBytes) != d) {
    quarantine(d, loc, "read: tree page checksum mismatch");
    return Status::IoError("tree page " + d.short_hex() + " in pack " + std::to_string(loc.pack) +
                           " at " + std::to_string(loc.offset) + " fails its checksum");
  }
  return std::shared_ptr<const Page>(std::move(page));
}

Result<std::shared_ptr<const Page>> Store::load_page(const Digest& d) {
  // Even a cache hit: whether a page is cached is luck, so no reactor may ask.
  RPOINT_ASSERT_MAY_BLOCK("tree page");
  if (d.is_zero()) return ZeroPage();
  if (auto p = pages_.get(d)) return p;
  STORE_ASSIGN_OR_RETURN(auto p, read_page_uncached(d));
  pages_.put(d, p);
  return p;
}

void Store::quarantine(const Digest& d, const ObjectLoc& loc, const std::string& why) {
  spdlog::error("store {}: object {} in pack {} at {} is damaged ({}): quarantined", opts_.dir,
                d.short_hex(), loc.pack, loc.offset, why);
  std::unique_lock<std::shared_mutex> g(gc_mu_);
  Status s = catalog_->quarantine({{d, loc}}, why);
  if (!s.ok()) {
    spdlog::error("store {}: quarantine of {}: {}", opts_.dir, d.short_hex(), s.ToString());
  }
  pages_.erase(d);
}

Result<std::vector<Store::LostPack>> Store::find_lost_packs() {
  STORE_ASSIGN_OR_RETURN(auto packs, catalog_->packs());
  std::vector<LostPack> lost;
  // Against GC, which removes a pack's row before its file.
  std::shared_lock<std::shared_mutex> g(gc_mu_);
  for (const PackRow& p : packs) {
    const std::string path = PackPath(packs_dir_, p.id);
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) lost.push_back({p.id, "pack file missing"});
    } else if (uint64_t(st.st_size) < p.bytes) {
      lost.push_back({p.id, "pack file is " + std::to_string(st.st_size) + " bytes, " +
                                std::to_string(p.bytes) + " recorded"});
    }
  }
  // A descriptor still open on a deleted file would read it until closed.
  for (const LostPack& l : lost) drop_pack_fd_locked(l.id);
  return lost;
}

Result<uint64_t> Store::quarantine_packs(const std::vector<LostPack>& lost) {
  uint64_t moved = 0;
  for (const LostPack& l : lost) {
    std::lock_guard<std::mutex> run(gc_run_mu_);
    std::unique_lock<std::shared_mutex> g(gc_mu_);
    STORE_ASSIGN_OR_RETURN(uint64_t n, catalog_->quarantine_pack(l.id, l.why));
    if (n == 0) continue;  // GC emptied it meanwhile, or already quarantined
    spdlog::error("store {}: pack {}: {}: its {} object(s) are quarantined; the next point of "
                  "each disk naming them copies those blocks again",
                  opts_.dir, l.id, l.why, n);
    moved += n;
  }
  return moved;
}

Result<uint64_t> Store::check_packs() {
  STORE_ASSIGN_OR_RETURN(auto lost, find_lost_packs());
  return quarantine_packs(lost);
}

Result<std::vector<uint64_t>> Store::damaged_slots(PointId id) {
  std::vector<uint64_t> out;
  STORE_RETURN_IF_ERROR(check_packs().status());
  STORE_ASSIGN_OR_RETURN(auto bad_list, catalog_->unhealed_bad_objects());
  if (bad_list.empty()) return out;
  std::unordered_set<Digest, DigestHash> bad(bad_list.begin(), bad_list.end());
  STORE_ASSIGN_OR_RETURN(auto reader, open_point(id));  // pins the root meanwhile
  const uint64_t slots = reader->slots();
  // Depth-first in slot order, so `out` comes sorted.
  std::function<Status(uint32_t, uint64_t, const Digest&)> walk =
      [&](uint32_t level, uint64_t index, const Digest& d) -> Status {
    if (d.is_zero()) return Status::Ok();
    if (bad.count(d)) {
      return Status::IoError("tree page " + d.short_hex() + " of point " + std::to_string(id) +
                             " is damaged");
    }
    STORE_ASSIGN_OR_RETURN(auto page, load_page(d));
    for (uint32_t i = 0; i < kFanout; ++i) {
      const Digest& e = page->e[i];
      uint64_t child = index * kFanout + i;
      if (e.is_zero()) continue;
      if (level > 1) {
        STORE_RETURN_IF_ERROR(walk(level - 1, child, e));
      } else if (child < slots && bad.count(e)) {
        out.push_back(child);
      }
    }
    return Status::Ok();
  };
  STORE_RETURN_IF_ERROR(walk(reader->depth(), 0, reader->info().root));
  return out;
}

void Store::pin(const Digest& root, uint32_t depth) {
  std::lock_guard<std::mutex> lock(reg_mu_);
  ++pins_[PinKey{root, depth}];
}

void Store::unpin(const Digest& root, uint32_t depth) {
  std::lock_guard<std::mutex> lock(reg_mu_);
  auto it = pins_.find(PinKey{root, depth});
  if (it != pins_.end() && --it->second == 0) pins_.erase(it);
}

void Store::register_writer(WriterRefs* w) {
  std::lock_guard<std::mutex> lock(reg_mu_);
  writers_.insert(w);
}

void Store::unregister_writer(WriterRefs* w) {
  std::lock_guard<std::mutex> lock(reg_mu_);
  writers_.erase(w);
}

void Store::note_ref_locked(WriterRefs* w, const Digest& d) {
  uint64_t p = d.prefix();
  w->prefixes.push_back(p);
  std::lock_guard<std::mutex> lock(reg_mu_);
  if (gc_active_) late_refs_.insert(p);
}

Result<std::unique_ptr<PointWriter>> Store::begin_point(const PointParams& p) {
  if (!ValidChunkSize(p.chunk_size)) {
    return Status::InvalidArgument("chunk size " + std::to_string(p.chunk_size) +
                                   " is not a power of two between 4 KiB and 4 MiB");
  }
  std::optional<PointRecord> parent;
  // Read the parent and pin its root atomically against a GC snapshot; the
  // writer registers under the same lock, so repair() sees every writer.
  std::shared_lock<std::shared_mutex> g(gc_mu_);
  if (p.parent != 0) {
    STORE_ASSIGN_OR_RETURN(auto rec, catalog_->get_point(p.parent));
    if (!rec) return Status::NotFound("parent point " + std::to_string(p.parent) + " not found");
    if (rec->fanout != kFanout) return Status::Unsupported("parent point has another fanout");
    if (rec->chunk_size != p.chunk_size) {
      return Status::InvalidArgument("chunk size " + std::to_string(p.chunk_size) +
                                     " differs from the parent's " +
                                     std::to_string(rec->chunk_size));
    }
    if (p.size < rec->size) {
      return Status::InvalidArgument("disk size " + std::to_string(p.size) +
                                     " is smaller than the parent's " + std::to_string(rec->size));
    }
    pin(rec->root, rec->depth);
    parent = std::move(rec);
  }
  return std::unique_ptr<PointWriter>(new PointWriter(shared_from_this(), p, std::move(parent)));
}

Result<PointInfo> Store::point(PointId id) {
  STORE_ASSIGN_OR_RETURN(auto rec, catalog_->get_point(id));
  if (!rec) return Status::NotFound("point " + std::to_string(id) + " not found");
  return std::move(*rec);
}

Result<std::vector<PointInfo>> Store::list_points() {
  return catalog_->list_points();
}

Status Store::delete_point(PointId id) {
  // The file first: a crash in between leaves a record without a file, which
  // Open gives its file back (the delete did not happen), never a file
  // without a record that a rebuild would resurrect after a completed delete.
  STORE_RETURN_IF_ERROR(RemoveFileDurable(points_dir_, PointFileName(id)));
  STORE_ASSIGN_OR_RETURN(bool existed, catalog_->delete_point(id));
  if (!existed) return Status::NotFound("point " + std::to_string(id) + " not found");
  return Status::Ok();
}

Result<std::vector<bool>> Store::has_objects(const std::vector<Digest>& objects) {
  std::vector<bool> out;
  out.reserve(objects.size());
  std::shared_lock<std::shared_mutex> g(gc_mu_);
  for (const Digest& d : objects) {
    auto loc = catalog_->lookup(d);
    if (!loc.ok()) return loc.status();
    out.push_back(loc.value().has_value());
  }
  return out;
}

Result<std::shared_ptr<PointReader>> Store::open_point(PointId id) {
  std::shared_lock<std::shared_mutex> g(gc_mu_);
  STORE_ASSIGN_OR_RETURN(auto rec, catalog_->get_point(id));
  if (!rec) return Status::NotFound("point " + std::to_string(id) + " not found");
  if (rec->fanout != kFanout) return Status::Unsupported("point has another fanout");
  pin(rec->root, rec->depth);
  return std::shared_ptr<PointReader>(new PointReader(shared_from_this(), std::move(*rec)));
}

Result<StoreStats> Store::stats() {
  StoreStats s;
  STORE_ASSIGN_OR_RETURN(auto pts, catalog_->list_points());
  s.points = pts.size();
  STORE_ASSIGN_OR_RETURN(auto packs, catalog_->packs());
  s.packs = packs.size();
  for (const PackRow& r : packs) s.pack_bytes += r.bytes;
  STORE_ASSIGN_OR_RETURN(s.objects, catalog_->object_count());
  return s;
}

}  // namespace rpoint::store
