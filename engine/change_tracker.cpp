#include "engine/change_tracker.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstddef>
#include <cstring>
#include <map>

#include "common/crc32c.h"
#include "common/fault_injection.h"
#include "common/file_io.h"

namespace rpoint {
namespace {

constexpr char kMagic[8] = {'R', 'P', 'C', 'T', 'B', 'M', '0', '2'};
// Files of older daemons: no coarse map, every fine bit durable before its write.
constexpr char kMagicV1[8] = {'R', 'P', 'C', 'T', 'B', 'M', '0', '1'};
constexpr uint64_t kHeaderBytes = 4096;
constexpr uint64_t kCoarseOffset = 64;
// Header flag: fine bits may lag the coarse map (the generation was still
// taking marks, or its fine pages were not made durable): open widens it.
constexpr uint32_t kFineIncomplete = 1;
// Header flag (this daemon writes it on every header): `crc` holds the CRC-32C
// of the header page (coarse map included) and, once the fine bits are
// complete, `fine_crc` that of the first `fine_pages` fine pages. Headers
// without it (older daemons) load unchecked; their reserved bytes are zero.
constexpr uint32_t kChecksummed = 2;
constexpr uint32_t kKnownFlags = kFineIncomplete | kChecksummed;
// A coarse region is 1/256 of the disk when the generation is made (rounded
// up to a power of two), and at least 1 MiB: at most 256 intent syncs per
// generation, and a crash over-reports at most 1/256 of the disk per region
// written. The map holds 32256 regions, so a disk may grow 126x before the
// blocks past the map are covered only by widening everything past it.
constexpr unsigned kMinCoarseLog2 = 20;
constexpr uint64_t kCoarsePerDisk = 256;
constexpr char kRetiredFile[] = "retired";
constexpr char kIdFile[] = "id";
// The generations the tracker holds and their inodes (see record_live()).
constexpr char kLiveFile[] = "live";
// Tries of one batch of marks before its writes fail with EIO.
constexpr int kMarkAttempts = 3;
// How often the flusher checks that the files still hold the history (a few
// stat calls): bounds how long a kill -9 after an operator's rm -rf can still
// find a history with holes (see the header).
constexpr auto kFileCheckInterval = std::chrono::seconds(1);

struct Header {
  char magic[8];
  uint32_t granularity;
  uint32_t flags;  // RPCTBM01: reserved, 0
  uint64_t generation;
  uint32_t coarse_shift;  // RPCTBM02: log2 of fine blocks per coarse region
  uint32_t crc;           // kChecksummed: of the header page with this field 0; else 0
  // kChecksummed and not kFineIncomplete: the fine map's CRC-32C (pages
  // [0, fine_pages), as on disk) as of when the fine bits were made complete;
  // else 0. Pages past fine_pages (a later resize) hold no mark.
  uint64_t fine_pages;
  uint32_t fine_crc;
  uint32_t reserved;
};
static_assert(sizeof(Header) <= kCoarseOffset);
constexpr size_t kCrcOffset = offsetof(Header, crc);

// CRC-32C of a header page, its crc field counted as zero.
uint32_t HeaderCrc(const char* page) {
  static const char zero[sizeof(uint32_t)] = {};
  uint32_t c = Crc32c(0, page, kCrcOffset);
  c = Crc32c(c, zero, sizeof zero);
  return Crc32c(c, page + kCrcOffset + sizeof zero, kHeaderBytes - kCrcOffset - sizeof zero);
}

// The header page of a generation: every header this daemon writes (a new
// generation's, an intent sync's, a finalize's) is made here, checksummed.
void EncodeHeader(char* page, uint32_t granularity, uint64_t generation, unsigned coarse_shift,
                  const uint64_t* coarse, bool incomplete, uint64_t fine_pages, uint32_t fine_crc) {
  std::memset(page, 0, kHeaderBytes);
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.granularity = granularity;
  h.flags = kChecksummed | (incomplete ? kFineIncomplete : 0);
  h.generation = generation;
  h.coarse_shift = coarse_shift;
  if (!incomplete) {
    h.fine_pages = fine_pages;
    h.fine_crc = fine_crc;
  }
  std::memcpy(page, &h, sizeof h);
  if (coarse)
    std::memcpy(page + kCoarseOffset, coarse, sizeof(uint64_t) * ChangeTracker::kCoarseWords);
  h.crc = HeaderCrc(page);
  std::memcpy(page, &h, sizeof h);
}

// Why a generation's header page (read whole, or `read` failed) cannot be
// trusted, or "" with *h filled. Such a file cannot say which blocks it
// marked. A checksummed header must match its CRC: any flipped bit (the
// coarse shift, the incomplete flag, a coarse bit) could make the open widen
// less than the generation marked. An unchecksummed one (older daemons) must
// have the zero bytes they always wrote where the checksum fields are now, so
// a flip of the kChecksummed flag itself cannot pass a header off as unchecked.
std::string CheckHeader(const char* page, const Status& read, uint32_t granularity, Header* h,
                        bool* v1) {
  std::string not_ours =
      "is not a change-tracking bitmap of granularity " + std::to_string(granularity);
  if (!read.ok()) return not_ours + " (" + read.ToString() + ")";
  std::memcpy(h, page, sizeof *h);
  *v1 = std::memcmp(h->magic, kMagicV1, 8) == 0;
  if (!*v1 && std::memcmp(h->magic, kMagic, 8) != 0) return not_ours;
  if (h->granularity != granularity) return not_ours;
  if (*v1) return "";
  if (h->flags & ~kKnownFlags) return "has unknown header flags " + std::to_string(h->flags);
  if (h->flags & kChecksummed) {
    if (HeaderCrc(page) != h->crc) return "fails its header checksum";
  } else {
    static const char zeros[kCoarseOffset] = {};
    if (std::memcmp(page + kCrcOffset, zeros, kCoarseOffset - kCrcOffset) != 0) {
      return "has a damaged header (its reserved bytes are set)";
    }
  }
  if (h->coarse_shift > 45) return "has a damaged header (coarse shift out of range)";
  return "";
}

unsigned CoarseShiftFor(uint64_t nblocks, unsigned shift) {
  unsigned cs = shift >= kMinCoarseLog2 ? 0 : kMinCoarseLog2 - shift;
  while ((nblocks >> cs) > kCoarsePerDisk) ++cs;
  return cs;
}

std::string GenPath(const std::string& dir, uint64_t gen) {
  char name[32];
  std::snprintf(name, sizeof name, "%016" PRIx64 ".ctbm", gen);
  return dir + "/" + name;
}

// Allocates every block a generation file of nblocks bits can ever need, so a
// mark written on the data path never needs a new block (a full state
// filesystem fails the cut that prepares a generation, never a guest write).
// Filesystems without fallocate get zeroes written past the current end.
uint64_t AllocatedBytes(uint64_t nblocks) {
  uint64_t pages = (nblocks + SparseBitmap::kBitsPerPage - 1) / SparseBitmap::kBitsPerPage;
  return kHeaderBytes + pages * SparseBitmap::kPageBytes;
}

Status Preallocate(int fd, const std::string& path, uint64_t nblocks) {
  off_t len = static_cast<off_t>(AllocatedBytes(nblocks));
  if (fallocate(fd, 0, 0, len) == 0) return Status::Ok();
  if (errno != EOPNOTSUPP) return Status::FromErrno(errno, "allocate " + path);
  struct stat st {};
  if (fstat(fd, &st) != 0) return Status::FromErrno(errno, "stat " + path);
  static const char zeros[SparseBitmap::kPageBytes] = {};
  for (off_t off = std::max<off_t>(st.st_size, kHeaderBytes); off < len;
       off += static_cast<off_t>(sizeof zeros)) {
    Status w = PwriteFull(fd, zeros, sizeof zeros, static_cast<uint64_t>(off), "allocate " + path);
    if (!w.ok()) return w;
  }
  return Status::Ok();
}

// Whether coarse region r is set in a coarse map's words: plain ones (a
// header's image) or a live generation's atomics (then a seq_cst load).
template <typename Word>
bool CoarseBit(const Word* words, uint64_t r) {
  uint64_t w = words[r / 64];
  return (w >> (r % 64)) & 1;
}

// A generation whose fine bits may lag its coarse map: every block of every
// coarse region set (and of every region past the map) counts as changed.
void Widen(SparseBitmap& bits, const uint64_t* coarse, unsigned cs) {
  uint64_t n = bits.size();
  for (uint64_t r = 0; r < ChangeTracker::kCoarseBits && (r << cs) < n; ++r) {
    if (CoarseBit(coarse, r)) bits.set_range(r << cs, ((r + 1) << cs) - 1);
  }
  uint64_t past = ChangeTracker::kCoarseBits << cs;
  if (past < n) bits.set_range(past, n - 1);
}

}  // namespace

ChangeTracker::ChangeTracker(const ChangeTrackerOptions& o)
    : dir_(o.dir),
      granularity_(o.granularity),
      shift_(static_cast<unsigned>(std::countr_zero(o.granularity))),
      nblocks_((o.disk_size + o.granularity - 1) / o.granularity) {
  coarse_shift_for_new_ = CoarseShiftFor(nblocks_.load(), shift_);
}

Result<std::unique_ptr<ChangeTracker>> ChangeTracker::Open(const ChangeTrackerOptions& options) {
  if (options.granularity < 4096 || !std::has_single_bit(options.granularity)) {
    return Status::InvalidArgument("tracking granularity must be a power of two >= 4096");
  }
  if ((options.disk_size + options.granularity - 1) / options.granularity >
      SparseBitmap::kMaxBits) {
    return Status::InvalidArgument("disk too large for change tracking at this granularity");
  }
  std::unique_ptr<ChangeTracker> t(new ChangeTracker(options));
  Status st = MakeDirs(t->dir_, 0700);
  if (!st.ok()) return st;
  t->dir_fd_.reset(::open(t->dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!t->dir_fd_) return Status::FromErrno(errno, "open " + t->dir_);
  st = t->load_or_make_id();
  if (!st.ok()) return st;
  st = t->load_existing();
  if (!st.ok()) return st;
  t->flusher_ = std::thread([p = t.get()] {
    pthread_setname_np(pthread_self(), "ct-flusher");
    p->flusher_loop();
  });
  return t;
}

ChangeTracker::~ChangeTracker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  const bool opened = flusher_.joinable();  // else Open failed: leave its files alone
  if (opened) flusher_.join();
  // A clean stop: no mark can come any more (the disk is closed), so the
  // active generation's fine bits are complete once on disk. Frozen ones the
  // flusher did not reach yet as well.
  std::unique_lock<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<Generation>> gens(to_finalize_.begin(), to_finalize_.end());
  if (active_) gens.push_back(active_);
  for (auto& g : gens) {
    Status st = finalize(*g);
    if (!st.ok()) spdlog::warn("change tracking {}: {} (it will be widened)", dir_, st.ToString());
  }
  lock.unlock();
  // Files lost since the flusher's last check: the restart must not read them.
  if (opened) watch_files();
}

bool ChangeTracker::Generation::coarse_covers(uint64_t first, uint64_t last) const {
  for (uint64_t r = first >> coarse_shift; r <= (last >> coarse_shift); ++r) {
    // Past the map: widened whole by an unclean open, once the flag is durable.
    if (r >= kCoarseBits) return incomplete_on_disk.load(std::memory_order_acquire);
    if (!CoarseBit(coarse.data(), r)) return false;
  }
  return true;
}

std::array<uint64_t, ChangeTracker::kCoarseWords> ChangeTracker::Generation::coarse_words() const {
  std::array<uint64_t, kCoarseWords> out{};
  for (uint64_t w = 0; w < kCoarseWords; ++w) out[w] = coarse[w].load();
  return out;
}

Result<std::shared_ptr<ChangeTracker::Generation>> ChangeTracker::create_generation(
    uint64_t number) {
  auto g = std::make_shared<Generation>();
  g->number = number;
  g->path = GenPath(dir_, number);
  g->bits = SparseBitmap(nblocks_.load());
  {
    std::lock_guard<std::mutex> lock(mu_);
    coarse_shift_for_new_ =
        std::max(coarse_shift_for_new_, CoarseShiftFor(nblocks_.load(), shift_));
    g->coarse_shift = coarse_shift_for_new_;
  }
  std::string tmp = g->path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return Status::FromErrno(errno, "create " + tmp);
  alignas(8) char header[kHeaderBytes];
  // Complete (no mark yet) over zero fine pages.
  EncodeHeader(header, granularity_, number, g->coarse_shift, nullptr, false, 0, 0);
  if (fault::Pwrite("tracking.create", fd.get(), header, sizeof header, 0) !=
      static_cast<ssize_t>(sizeof header)) {
    return Status::FromErrno(errno ? errno : EIO, "write " + tmp);
  }
  Status pre = Preallocate(fd.get(), tmp, g->bits.size());
  if (!pre.ok()) {
    unlink(tmp.c_str());
    return pre;
  }
  if (fault::Fdatasync("tracking.create", fd.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync " + tmp);
  }
  if (fault::Rename("tracking.create", tmp.c_str(), g->path.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + tmp);
  }
  Status st = FsyncDir(dir_fd_.get(), dir_);
  if (!st.ok()) return st;
  g->fd = std::move(fd);
  g->min_size = AllocatedBytes(g->bits.size());
  return g;
}

Status ChangeTracker::load_or_make_id() {
  std::string path = dir_ + "/" + kIdFile;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd) {
    char text[32] = {};
    ssize_t n = pread(fd.get(), text, sizeof text - 1, 0);
    if (n > 0) id_ = std::strtoull(text, nullptr, 16);
    if (id_.load() != 0) return Status::Ok();
    // An empty or torn id (a crash while making it): no consumer can have
    // recorded it yet (it is made before the first generation), so make it anew.
  } else if (errno != ENOENT) {
    return Status::FromErrno(errno, "open " + path);
  }
  return make_id();
}

Status ChangeTracker::make_id() {
  const uint64_t old = id_.load();
  uint64_t id = 0;
  while (id == 0 || id == old) {
    if (getrandom(&id, sizeof id, 0) != static_cast<ssize_t>(sizeof id)) {
      return Status::FromErrno(errno, "getrandom");
    }
  }
  // In memory first: whatever this returns, the old id is never answered
  // again (a consumer's base recorded against it copies in full).
  id_ = id;
  char text[32];
  int len = std::snprintf(text, sizeof text, "%016" PRIx64 "\n", id);
  return replace_file(kIdFile, std::string(text, static_cast<size_t>(len)));
}

Status ChangeTracker::replace_file(const char* name, const std::string& text) {
  return WriteFileAtomic(dir_, name, text, 0600, dir_fd_.get());
}

Status ChangeTracker::load_existing() {
  std::map<uint64_t, std::string> found;
  std::unique_ptr<DIR, int (*)(DIR*)> d(opendir(dir_.c_str()), closedir);
  if (!d) return Status::FromErrno(errno, "opendir " + dir_);
  while (dirent* e = readdir(d.get())) {
    std::string name = e->d_name;
    if (name == kRetiredFile) ever_retired_ = true;
    if (name.size() == 21 && name.ends_with(".ctbm")) {
      found[std::strtoull(name.substr(0, 16).c_str(), nullptr, 16)] = dir_ + "/" + name;
    } else if (name.ends_with(".tmp")) {
      unlinkat(dir_fd_.get(), name.c_str(), 0);  // a generation that never became durable
    }
  }
  // Generation numbers never go back (consumers record them): the next one
  // is above every file and above the last retired generation.
  uint64_t last = 0;
  if (ever_retired_) {
    char text[32] = {};
    UniqueFd m(::open((dir_ + "/" + kRetiredFile).c_str(), O_RDONLY | O_CLOEXEC));
    if (m && pread(m.get(), text, sizeof text - 1, 0) > 0) last = std::strtoull(text, nullptr, 10);
    retired_through_ = last;
  }
  std::vector<std::string> unmarked;
  std::string damaged;  // the first unreadable generation file, and why
  // Every generation the last run recorded (record_live) and did not retire
  // must still be its file: one deleted or replaced while it ran, and no
  // file check caught it before a kill -9, would be a history with a hole.
  // No record where a history is claimed (generation files, or a retired
  // marker) is no proof either: the record may be gone with the file it
  // listed. Such a history is dropped (a directory from a daemon older than
  // the record, too: one full point).
  UniqueFd live(::open((dir_ + "/" + kLiveFile).c_str(), O_RDONLY | O_CLOEXEC));
  const int live_errno = live ? 0 : errno;
  if (live) {
    Result<std::string> read = ReadWholeFile(live.get(), dir_ + "/" + kLiveFile);
    if (!read.ok()) return read.status();
    const std::string& text = read.value();
    size_t at = 0;
    while (damaged.empty() && at < text.size()) {
      size_t eol = text.find('\n', at);
      std::string line = text.substr(at, eol == std::string::npos ? eol : eol - at);
      at = eol == std::string::npos ? text.size() : eol + 1;
      uint64_t number = 0;
      unsigned long long ino = 0;
      if (std::sscanf(line.c_str(), "%" SCNx64 " %llu", &number, &ino) != 2) {
        damaged = dir_ + "/" + kLiveFile + " is unreadable";
        break;
      }
      if (ever_retired_ && number <= retired_through_) continue;  // retired: deleted on purpose
      std::string path = GenPath(dir_, number);
      struct stat st {};
      if (stat(path.c_str(), &st) != 0) {
        damaged = path + ": " + std::strerror(errno) + " (the last run held it)";
      } else if (st.st_ino != ino) {
        damaged = path + " was replaced (not the file the tracker wrote)";
      }
    }
  }
  if (!live && damaged.empty() && (ever_retired_ || !found.empty())) {
    damaged = dir_ + "/" + kLiveFile + ": " + std::strerror(live_errno) +
              " (the record of the generations the last run held)";
  }
  for (auto& [number, path] : found) {
    last = std::max(last, number);
    auto g = std::make_shared<Generation>();
    g->number = number;
    g->path = path;
    g->bits = SparseBitmap(nblocks_.load());
    g->fd.reset(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (!g->fd) return Status::FromErrno(errno, "open " + path);
    alignas(8) char page0[kHeaderBytes] = {};
    Header h{};
    bool v1 = false;
    std::string bad = CheckHeader(page0, PreadFull(g->fd.get(), page0, sizeof page0, 0, path),
                                  granularity_, &h, &v1);
    struct stat fst {};
    if (!v1 && fstat(g->fd.get(), &fst) == 0) g->min_size = static_cast<uint64_t>(fst.st_size);
    if (!bad.empty()) {
      // Zeroed, truncated into its header, of another granularity, garbage,
      // a flipped bit: which blocks it marked is unknown, so no history can
      // be trusted.
      if (damaged.empty()) damaged = path + " " + bad;
      continue;
    }
    bool v2 = !v1;
    // A complete checksummed generation's fine map is checked as it is read.
    bool verify_fine = v2 && (h.flags & kChecksummed) && !(h.flags & kFineIncomplete);
    uint32_t fine_crc = 0;
    uint64_t fine_seen = 0;  // pages of the fine map folded into fine_crc
    std::vector<uint64_t> page(SparseBitmap::kWordsPerPage), seen(SparseBitmap::kWordsPerPage);
    for (size_t p = 0; p < g->bits.page_count(); ++p) {
      ssize_t n = pread(g->fd.get(), page.data(), SparseBitmap::kPageBytes,
                        static_cast<off_t>(kHeaderBytes + p * SparseBitmap::kPageBytes));
      if (verify_fine && p < h.fine_pages) {
        // As read, a missing or short page's absent bytes as zero (they are
        // counted as changed below anyway).
        std::fill(seen.begin(), seen.end(), 0);
        if (n > 0) std::memcpy(seen.data(), page.data(), static_cast<size_t>(n));
        fine_crc = Crc32c(fine_crc, seen.data(), SparseBitmap::kPageBytes);
        ++fine_seen;
      }
      if (n < static_cast<ssize_t>(SparseBitmap::kPageBytes) && v2) {
        // Every RPCTBM02 file is allocated whole for its disk's size before a
        // mark can land (Preallocate), so a short one was truncated (or lost
        // a crashed resize's allocation): the blocks of its missing bytes
        // count as changed.
        uint64_t from =
            p * SparseBitmap::kBitsPerPage + static_cast<uint64_t>(std::max<ssize_t>(n, 0)) * 8;
        if (from < g->bits.size()) {
          spdlog::warn(
              "change tracking {}: generation {} is shorter than its disk needs: "
              "blocks {}..{} count as changed",
              dir_, number, from, g->bits.size() - 1);
          g->bits.set_range(from, g->bits.size() - 1);
        }
      }
      if (n <= 0) break;  // RPCTBM01 sparse tail: nothing was ever marked there
      if (n < static_cast<ssize_t>(SparseBitmap::kPageBytes)) {
        std::memset(reinterpret_cast<char*>(page.data()) + n, 0, SparseBitmap::kPageBytes - n);
      }
      g->bits.or_page(p, page.data());
      if (n < static_cast<ssize_t>(SparseBitmap::kPageBytes)) break;
    }
    if (verify_fine) {
      static const uint64_t zeros[SparseBitmap::kWordsPerPage] = {};
      for (; fine_seen < h.fine_pages; ++fine_seen) {
        fine_crc = Crc32c(fine_crc, zeros, SparseBitmap::kPageBytes);
      }
    }
    if (v2) {
      g->coarse_shift = h.coarse_shift;
      uint64_t words[kCoarseWords];
      std::memcpy(words, page0 + kCoarseOffset, sizeof words);
      for (uint64_t w = 0; w < kCoarseWords; ++w) g->coarse[w].store(words[w]);
      g->incomplete_on_disk = (h.flags & kFineIncomplete) != 0;
      if (verify_fine && fine_crc != h.fine_crc) {
        // A fine bit cleared would be a change the next point skips. The
        // header (checked) still holds the coarse map, and every fine bit is
        // inside it (a bit becomes visible only once its region is durable;
        // past the map only with the flag, which widening covers whole): so
        // the answer is the crash's own, widening, and finalizing it anew.
        spdlog::error(
            "change tracking {}: generation {} fails its fine-map checksum (a flipped bit on "
            "disk?): it is widened as after a crash; its next point over-reports, never misses",
            dir_, number);
        g->incomplete_on_disk = true;
      }
      if (g->incomplete_on_disk) {
        uint64_t before = g->bits.count();
        Widen(g->bits, words, g->coarse_shift);
        spdlog::info(
            "change tracking {}: generation {} was not stopped cleanly: widened from {} to "
            "{} blocks (every block of each region marked in its coarse map)",
            dir_, number, before, g->bits.count());
      }
    }
    if (g->bits.find_next(0) == g->bits.size()) {
      // Never marked (e.g. the pre-made next generation): nothing to keep,
      // once the new active generation (numbered above it) is durable.
      unmarked.push_back(path);
      continue;
    }
    // Crashed generations (the one active at the crash included) all count as
    // changes not yet in a successful restore point. A widened one gets its
    // widened bits written and its flag cleared behind (the same bits each
    // time it is opened until then).
    if (g->incomplete_on_disk) to_finalize_.push_back(g);
    frozen_.push_back(std::move(g));
  }
  if (!damaged.empty()) {
    Status st = forget_history(damaged);
    if (!st.ok()) return st;
    frozen_.clear();
    to_finalize_.clear();
    unmarked.clear();
  }
  if (!frozen_.empty()) {
    spdlog::info("change tracking {}: recovered {} generation(s), {} changed blocks", dir_,
                 frozen_.size(), changed().count());
  }
  auto active = create_generation(last + 1);
  if (!active.ok()) return active.status();
  active_ = std::move(active).value();
  active_raw_.store(active_.get());
  state_.store(active_->number << 1);
  behind_through_ = active_->number - 1;  // the crashed ones: written behind at once
  // The new record before the unmarked files go (it no longer lists them).
  Status rec = record_live();
  if (!rec.ok()) return rec;
  for (const auto& path : unmarked) unlink(path.c_str());
  // The next generation is made (fully allocated) by the cut that needs it,
  // before it publishes: only one fully allocated file exists between points.
  return Status::Ok();
}

Status ChangeTracker::forget_history(const std::string& why) {
  // Failing the open (or every cut) would take the disk out of service, or
  // the VM out of restore points, for the sake of an optimisation. Instead
  // the tracker starts over as a new one: a new id, so no consumer's recorded
  // generation matches it (their next copy is full, and no rpoint:changed
  // context answers from it), and no retirement, so all_since_creation()
  // forces a full copy for bases recorded without an id. The id first: a
  // crash before the files go redoes all of this.
  spdlog::error(
      "change tracking {}: {}: which blocks changed is unknown, so the tracking history of "
      "this disk is dropped; the next restore point of every collection copies the whole disk",
      dir_, why);
  // The directory itself may be gone or replaced (rm -rf, a lost mount): the
  // files from now on go to the one at dir_.
  Status st = MakeDirs(dir_, 0700);
  if (!st.ok()) return st;
  UniqueFd dfd(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dfd) return Status::FromErrno(errno, "open " + dir_);
  dir_fd_ = std::move(dfd);
  st = make_id();
  if (!st.ok()) return st;
  for (const char* name : {kLiveFile, kRetiredFile}) {
    if (unlinkat(dir_fd_.get(), name, 0) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "unlink " + dir_ + "/" + name);
    }
  }
  // Every generation file there, damaged or not: none is this tracker's any
  // more. Open generations keep their fds (a running disk goes on marking in
  // memory) but are detached: their files no longer count.
  std::unique_ptr<DIR, int (*)(DIR*)> d(opendir(dir_.c_str()), closedir);
  if (!d) return Status::FromErrno(errno, "opendir " + dir_);
  while (dirent* e = readdir(d.get())) {
    std::string name = e->d_name;
    if ((name.size() == 21 && name.ends_with(".ctbm")) || name.ends_with(".ctbm.tmp")) {
      if (unlinkat(dir_fd_.get(), name.c_str(), 0) != 0 && errno != ENOENT) {
        return Status::FromErrno(errno, "unlink " + dir_ + "/" + name);
      }
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& g : frozen_) g->detached = true;
    if (active_) active_->detached = true;
    next_.reset();  // its file went too; the cut makes a new one
    ever_retired_ = false;
    retired_through_ = 0;
  }
  recorded_through_ = 0;
  damage_reported_ = false;
  return FsyncDir(dir_fd_.get(), dir_);
}

Status ChangeTracker::record_live() {
  std::vector<std::shared_ptr<Generation>> gens;
  {
    std::lock_guard<std::mutex> lock(mu_);
    gens = frozen_;
    if (active_) gens.push_back(active_);
    if (next_) gens.push_back(next_);
  }
  std::string text;
  uint64_t highest = 0;
  for (const auto& g : gens) {
    if (g->detached) continue;
    struct stat st {};
    if (fstat(g->fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + g->path);
    char line[64];
    std::snprintf(line, sizeof line, "%016" PRIx64 " %llu\n", g->number,
                  static_cast<unsigned long long>(st.st_ino));
    text += line;
    highest = std::max(highest, g->number);
  }
  // Replaced by rename (as the retired marker): never torn, never empty.
  Status st = replace_file(kLiveFile, text);
  if (!st.ok()) return st;
  recorded_through_ = highest;
  return Status::Ok();
}

std::string ChangeTracker::find_damage(bool* dir_lost) const {
  struct stat a {};
  struct stat b {};
  *dir_lost = true;
  if (stat(dir_.c_str(), &a) != 0) return dir_ + ": " + std::strerror(errno);
  if (fstat(dir_fd_.get(), &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
    return dir_ + " was removed or replaced";
  }
  *dir_lost = false;
  for (const char* name : {kIdFile, kLiveFile}) {
    std::string path = dir_ + "/" + name;
    if (stat(path.c_str(), &a) != 0) return path + ": " + std::strerror(errno);
  }
  std::vector<std::shared_ptr<Generation>> gens;
  {
    std::lock_guard<std::mutex> lock(mu_);
    gens = frozen_;
    if (active_) gens.push_back(active_);
    if (next_) gens.push_back(next_);
  }
  for (const auto& g : gens) {
    if (g->detached) continue;
    if (stat(g->path.c_str(), &a) != 0) return g->path + ": " + std::strerror(errno);
    if (fstat(g->fd.get(), &b) != 0) return g->path + ": " + std::strerror(errno);
    if (a.st_dev != b.st_dev || a.st_ino != b.st_ino) return g->path + " was replaced";
    uint64_t want = g->min_size.load();
    if (static_cast<uint64_t>(b.st_size) < want) {
      return g->path + " was truncated (" + std::to_string(b.st_size) + " bytes of " +
             std::to_string(want) + ")";
    }
  }
  return "";
}

void ChangeTracker::watch_files() {
  std::unique_lock<std::mutex> r(reset_mu_, std::try_to_lock);
  if (!r) return;  // a cut or a retirement is at the files; it checks or is checked next time
  bool dir_lost = false;
  std::string why = find_damage(&dir_lost);
  // A directory gone needs nothing here: a restart without it is a new
  // tracker. One replaced may be another tracker's (a disk of the same name
  // made again while this one's last user lets go): never touched; a cut of
  // this disk, if any comes, drops the history (prepare_next).
  if (why.empty() || dir_lost) return;
  // No in-memory change here (a cut in progress must not see its history
  // change under it): only what a restart reads. Without an id file the
  // restart is a new tracker; without the retired file, one never retired.
  // The next cut drops the history in memory too (prepare_next).
  int gone = 0;
  for (const char* name : {kIdFile, kRetiredFile}) {
    std::string path = dir_ + "/" + name;
    if (unlink(path.c_str()) == 0) ++gone;
  }
  if (gone > 0) (void)FsyncDir(dir_);
  if (!damage_reported_) {
    damage_reported_ = true;
    spdlog::error(
        "change tracking {}: {}: the tracking files no longer hold this disk's history; the "
        "next restore point of every collection copies the whole disk",
        dir_, why);
  }
}

ChangeTracker::View ChangeTracker::view() const {
  for (;;) {
    uint64_t s = state_.load(std::memory_order_seq_cst);
    if (!(s & 1)) {
      // Unarmed. active_raw_ may already be the next generation (settle stores
      // it first): a newer generation than the epoch is safe to mark in.
      return {s >> 1, active_raw_.load(std::memory_order_acquire)};
    }
    std::shared_ptr<const Arm> a = arm_.load();
    if (!a) continue;  // settled or disarmed since: state_ has moved on
    // An Arm is self-consistent even if it is a later cut's than the state
    // word read above: it tells the epoch at the time of this load.
    if (a->sw->published()) return {a->next->number, a->next.get()};
    return {a->active->number, a->active.get()};
  }
}

std::shared_ptr<ChangeTracker::Generation> ChangeTracker::current_locked() const {
  if (armed_ && armed_->sw->published()) return armed_->next;
  return active_;
}

uint64_t ChangeTracker::enter() {
  for (;;) {
    uint64_t e = view().epoch;
    inflight_[e % 4].fetch_add(1);
    if (view().epoch == e) return e;
    leave(e);  // wakes a retirement waiter that saw the transient ticket
  }
}

void ChangeTracker::leave(uint64_t epoch) {
  // seq_cst on both sides (here and in wait_writes_left): either the waiter
  // sees the count at zero or this thread sees the waiter and wakes it.
  if (inflight_[epoch % 4].fetch_sub(1) == 1 && retire_waiters_.load() > 0) {
    std::lock_guard<std::mutex> lock(retire_mu_);
    retire_cv_.notify_all();
  }
}

bool ChangeTracker::ensure_marked(uint64_t offset, uint64_t length, Reactor& reactor,
                                  std::function<void(Status)> done) {
  if (length == 0) return true;
  uint64_t first = offset >> shift_;
  uint64_t last = (offset + length - 1) >> shift_;
  // The caller holds an epoch ticket, so the current generation (numbered at
  // least the ticket's epoch) cannot be retired under us.
  Generation* g = view().gen;
  if (g->bits.all_set(first, last)) return true;
  if (mark_fast(first, last)) return true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back({first, last, &reactor, std::move(done)});
  }
  cv_.notify_one();
  return false;
}

bool ChangeTracker::mark_fast(uint64_t first, uint64_t last) {
  // The visibility rules of the header, in order: unarmed; announced; still
  // the same unarmed epoch once announced (else arm() may have missed us);
  // no flusher batch for an older generation still running; the coarse
  // regions durable. seq_cst throughout (state_, marking_, batch_gen_).
  uint64_t s = state_.load(std::memory_order_seq_cst);
  if (s & 1) return false;
  uint64_t e = s >> 1;
  std::atomic<int64_t>& m = marking_[e % 2];
  m.fetch_add(1, std::memory_order_seq_cst);
  bool ok = false;
  if (state_.load(std::memory_order_seq_cst) == s) {
    Generation* g = active_raw_.load(std::memory_order_acquire);
    uint64_t b = batch_gen_.load(std::memory_order_seq_cst);
    if (g->number == e && (b == 0 || b >= e) && g->coarse_covers(first, last)) {
      g->bits.set_range(first, last);
      ok = true;
    }
  }
  m.fetch_sub(1, std::memory_order_seq_cst);  // release: arm() sees the bits set
  return ok;
}

Status ChangeTracker::write_header(Generation& gen,
                                   const std::array<uint64_t, kCoarseWords>& coarse,
                                   bool incomplete, uint64_t fine_pages, uint32_t fine_crc) {
  alignas(8) char page[kHeaderBytes];
  EncodeHeader(page, granularity_, gen.number, gen.coarse_shift, coarse.data(), incomplete,
               fine_pages, fine_crc);
  Status st = PwriteFull(gen.fd.get(), page, sizeof page, 0, gen.path, "tracking.write");
  if (!st.ok()) return st;
  if (fault::Fdatasync("tracking.sync", gen.fd.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync " + gen.path);
  }
  marks_written_.fetch_add(1);
  return Status::Ok();
}

Status ChangeTracker::write_marks(Generation& gen, const std::vector<Pending>& batch) {
  // The coarse regions the batch needs that are not durable yet: one header
  // write + fdatasync for all of them (the whole map is rewritten: a retry
  // after a failed sync never trusts what that sync may have dropped).
  std::array<uint64_t, kCoarseWords> coarse = gen.coarse_words();
  bool fresh = false;
  for (const Pending& p : batch) {
    for (uint64_t r = p.first >> gen.coarse_shift; r <= (p.last >> gen.coarse_shift); ++r) {
      if (r >= kCoarseBits) {
        // Past the map (a disk grown 126x in this generation): no coarse bit,
        // the flag alone makes an unclean open widen it, and it is what makes
        // finalize() write the fine bits at all.
        fresh |= !gen.incomplete_on_disk.load();
        break;
      }
      if (!CoarseBit(coarse.data(), r)) {
        coarse[r / 64] |= 1ull << (r % 64);
        fresh = true;
      }
    }
  }
  if (fresh) {
    Status st = write_header(gen, coarse, true);
    if (!st.ok()) return st;
    syncs_.fetch_add(1);  // intent syncs only (finalize's do not delay a write)
    gen.incomplete_on_disk = true;
    for (uint64_t w = 0; w < kCoarseWords; ++w) {
      gen.coarse[w].fetch_or(coarse[w], std::memory_order_acq_rel);
    }
  }
  // Durable intent: only now may readers see the fine bits (and skip the slow path).
  for (const Pending& p : batch) gen.bits.set_range(p.first, p.last);
  return Status::Ok();
}

Status ChangeTracker::finalize(Generation& gen) {
  if (!gen.incomplete_on_disk) return Status::Ok();
  // The CRC of the fine map as it will be on disk: a page never set in memory
  // was never written, so it is still the zeroes Preallocate made.
  static const uint64_t zeros[SparseBitmap::kWordsPerPage] = {};
  const size_t pages = gen.bits.page_count();
  uint32_t fine_crc = 0;
  for (size_t pi = 0; pi < pages; ++pi) {
    const uint64_t* words = gen.bits.page_words(pi);
    if (!words) {
      fine_crc = Crc32c(fine_crc, zeros, SparseBitmap::kPageBytes);
      continue;
    }
    std::vector<uint64_t> copy(words, words + SparseBitmap::kWordsPerPage);
    fine_crc = Crc32c(fine_crc, copy.data(), SparseBitmap::kPageBytes);
    Status st =
        PwriteFull(gen.fd.get(), copy.data(), SparseBitmap::kPageBytes,
                   kHeaderBytes + pi * SparseBitmap::kPageBytes, gen.path, "tracking.write");
    if (!st.ok()) return st;
    marks_written_.fetch_add(1);
  }
  // The fine pages durable before the header stops saying they may lag.
  if (fault::Fdatasync("tracking.sync", gen.fd.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync " + gen.path);
  }
  // Then the header that says they are complete, with their CRC: until it is
  // durable the flag stands, so a crash or a torn page write before it is
  // widened (the fine pages are not checked), never taken for damage.
  Status st = write_header(gen, gen.coarse_words(), false, pages, fine_crc);
  if (!st.ok()) return st;
  gen.incomplete_on_disk = false;
  finalized_.fetch_add(1);
  return Status::Ok();
}

void ChangeTracker::flusher_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  auto next_check = std::chrono::steady_clock::now() + kFileCheckInterval;
  // Frozen generations are written behind only up to behind_through_, which
  // write_behind() moves once every disk of the cut settled: never inside the
  // cut's publish window (settle() files them there, and no thread may wake
  // to take the CPU from the cutting thread), whatever woke the flusher. A
  // value under mu_, so no wake-up can be lost.
  auto behind_due = [&] {
    return !to_finalize_.empty() && to_finalize_.front()->number <= behind_through_;
  };
  for (;;) {
    if (!stopping_ && queue_.empty() && !behind_due()) {
      if (cv_.wait_until(lock, next_check) == std::cv_status::timeout) {
        lock.unlock();
        watch_files();
        lock.lock();
        next_check = std::chrono::steady_clock::now() + kFileCheckInterval;
      }
      continue;
    }
    if (queue_.empty()) {
      if (stopping_) return;  // the destructor writes what is left
      // A frozen generation takes no more marks (settle() queued it after
      // arm() drained the fast marks, and its batches ran before this one).
      std::shared_ptr<Generation> g = to_finalize_.front();
      lock.unlock();
      Status st = finalize(*g);
      // Not fatal: the generation stays flagged, and a crash before it is
      // retired widens it (over-reports).
      if (!st.ok()) spdlog::warn("change tracking {}: {}", dir_, st.ToString());
      lock.lock();
      to_finalize_.pop_front();
      synced_cv_.notify_all();
      continue;
    }
    std::vector<Pending> batch(std::make_move_iterator(queue_.begin()),
                               std::make_move_iterator(queue_.end()));
    queue_.clear();
    // The generation of the epoch current now, published switch included:
    // a batch holding a mark of a new-epoch write was queued after that write
    // saw the switch published, so it goes to the new generation. Batches run
    // one after the other, so every bit of a frozen generation is visible
    // before any bit of the next one is (see the header). batch_gen_ keeps the
    // fast path of a newer epoch off until this batch's bits are visible.
    std::shared_ptr<Generation> gen = current_locked();
    batch_gen_.store(gen->number, std::memory_order_seq_cst);
    ++batches_started_;
    lock.unlock();
    Status st = write_marks(*gen, batch);
    // A transient failure is retried before the writes waiting on it fail.
    for (int attempt = 1; !st.ok() && attempt < kMarkAttempts; ++attempt) {
      spdlog::warn("change tracking {}: {}; retrying", dir_, st.ToString());
      std::this_thread::sleep_for(std::chrono::milliseconds(10 * attempt));
      st = write_marks(*gen, batch);
    }
    batch_gen_.store(0, std::memory_order_seq_cst);
    if (!st.ok()) spdlog::error("change tracking {}: {}", dir_, st.ToString());
    for (Pending& p : batch) {
      p.reactor->post([done = std::move(p.done), st] { done(st); });
    }
    lock.lock();
    ++batches_done_;
    synced_cv_.notify_all();
  }
}

Status ChangeTracker::sync() {
  write_behind();  // a settled generation is written even if nobody asked yet
  std::unique_lock<std::mutex> lock(mu_);
  uint64_t target = batches_started_ + (queue_.empty() ? 0 : 1);
  synced_cv_.wait(lock,
                  [&] { return (batches_done_ >= target && to_finalize_.empty()) || stopping_; });
  return Status::Ok();
}

Result<ChangeTracker::Armed> ChangeTracker::arm(std::shared_ptr<const CutSwitch> sw,
                                                uint64_t after) {
  Status st = prepare_next();  // no-op when the cut prepared it already
  if (!st.ok()) return st;
  std::unique_lock<std::mutex> lock(mu_);
  if (armed_) return Status::Conflict("change tracking " + dir_ + ": a cut is already armed");
  if (!next_) return Status::Conflict("change tracking " + dir_ + ": retry the cut");
  uint64_t e = active_->number;
  // The new epoch's ticket slot must be free of writes four epochs back.
  if (inflight_[(e + 1) % 4].load() != 0) {
    return Status::Conflict("writes from an old epoch are still in flight; retry the cut");
  }
  next_->bits.resize(nblocks_.load());
  Armed out;
  out.frozen = e;
  if (after != 0) out.history_gap = history_gap_locked(after);
  for (const auto& g : frozen_) {
    if (g->number > after) out.bitmaps.emplace_back(g, &g->bits);
  }
  if (e > after) out.bitmaps.emplace_back(active_, &active_->bits);
  armed_ = std::make_shared<const Arm>(Arm{std::move(sw), active_, next_});
  // The Arm before the bit: a reader that sees the bit finds the Arm.
  arm_.store(armed_);
  state_.store((e << 1) | 1, std::memory_order_seq_cst);
  lock.unlock();  // a reactor's slow path may need mu_ meanwhile
  // Fast marks that read the unarmed epoch finish before the switch can be
  // published (see the header); new ones see the armed bit and queue. Each
  // is a few atomic ORs on a reactor thread: at most a preempted thread's
  // time slice, and before the publish, so no write waits for it.
  while (marking_[e % 2].load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  return out;
}

uint64_t ChangeTracker::settle() {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t e = active_->number;
  if (!armed_) return e;  // nothing armed (defensive)
  frozen_.push_back(active_);
  // Its fine bits to disk behind (flusher): it takes no more marks.
  to_finalize_.push_back(active_);
  active_ = std::move(next_);
  // Published already: readers see the next generation through the Arm; the
  // plain word takes over before the Arm goes.
  active_raw_.store(active_.get(), std::memory_order_release);
  state_.store(active_->number << 1, std::memory_order_seq_cst);
  arm_.store(nullptr);
  armed_.reset();
  // No wake-up here: see write_behind().
  return e;
}

void ChangeTracker::write_behind() {
  {
    // Every generation settled so far (all older than the active one).
    std::lock_guard<std::mutex> lock(mu_);
    behind_through_ = active_->number - 1;
  }
  cv_.notify_one();
}

void ChangeTracker::disarm() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!armed_) return;
  state_.store(active_->number << 1, std::memory_order_seq_cst);
  arm_.store(nullptr);
  armed_.reset();
}

Result<uint64_t> ChangeTracker::flip() {
  auto sw = std::make_shared<CutSwitch>();
  auto armed = arm(sw);
  if (!armed.ok()) return armed.status();
  sw->publish();
  uint64_t frozen = settle();
  write_behind();
  return frozen;
}

Status ChangeTracker::prepare_next() {
  std::lock_guard<std::mutex> files(reset_mu_);
  // Before the cut decides anything (FileDisk::arm_cut reads
  // all_since_creation() after this): lost files make this point full.
  bool dir_lost = false;
  std::string why = find_damage(&dir_lost);
  if (!why.empty()) {
    Status st = forget_history(why + " while the daemon ran");
    if (!st.ok()) return st;
  }
  uint64_t number;
  bool have_next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    number = active_->number + 1;
    have_next = next_ != nullptr;
    if (have_next && recorded_through_ >= number) return Status::Ok();
  }
  if (!have_next) {
    auto next = create_generation(number);
    if (!next.ok()) return next.status();
    std::lock_guard<std::mutex> lock(mu_);
    if (!next_ && active_->number + 1 == number) next_ = std::move(next).value();
  }
  // Recorded before the cut can make it active (a failed record fails the cut).
  return record_live();
}

SparseBitmap ChangeTracker::changed(uint64_t after) const {
  std::lock_guard<std::mutex> lock(mu_);
  SparseBitmap out(nblocks_.load());
  for (const auto& g : frozen_) {
    if (g->number > after) out.merge(g->bits);
  }
  return out;
}

std::string ChangeTracker::history_gap_locked(uint64_t after) const {
  // Retirement deletes every generation through its number: the history
  // after `after` is whole unless a retirement went past it. (Never-marked
  // generations are dropped at Open without retiring: they held nothing.)
  if (after >= active_->number) {
    return "generation " + std::to_string(after) +
           " is not one this tracker froze (the active one is " + std::to_string(active_->number) +
           ")";
  }
  if (ever_retired_ && retired_through_ > after) {
    return "the generations after " + std::to_string(after) + " were retired through " +
           std::to_string(retired_through_) + " (a later restore point succeeded)";
  }
  return "";
}

bool ChangeTracker::changed_since(uint64_t after, SparseBitmap* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!history_gap_locked(after).empty()) return false;
  if (!out) return true;
  SparseBitmap bits(nblocks_.load());
  for (const auto& g : frozen_) {
    if (g->number > after) bits.merge(g->bits);
  }
  bits.merge(active_->bits);
  *out = std::move(bits);
  return true;
}

std::vector<std::shared_ptr<const SparseBitmap>> ChangeTracker::frozen_bitmaps(
    uint64_t after) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<const SparseBitmap>> out;
  for (const auto& g : frozen_) {
    if (g->number > after) out.emplace_back(g, &g->bits);
  }
  return out;
}

std::vector<uint64_t> ChangeTracker::frozen_generations() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint64_t> out;
  for (const auto& g : frozen_) out.push_back(g->number);
  std::sort(out.begin(), out.end());
  return out;
}

bool ChangeTracker::all_since_creation() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !ever_retired_;
}

bool ChangeTracker::writes_left(uint64_t gen) const {
  uint64_t e = view().epoch;
  for (uint64_t k = (e >= 3 ? e - 3 : 0); k <= gen && k < e; ++k) {
    if (inflight_[k % 4].load() != 0) return false;
  }
  return true;
}

bool ChangeTracker::wait_writes_left(uint64_t gen, std::chrono::milliseconds timeout) {
  if (writes_left(gen)) return true;
  retire_waiters_.fetch_add(1);
  bool left;
  {
    std::unique_lock<std::mutex> lock(retire_mu_);
    left = retire_cv_.wait_for(lock, timeout, [&] { return writes_left(gen); });
  }
  retire_waiters_.fetch_sub(1);
  return left;
}

Status ChangeTracker::retire_through(uint64_t gen) {
  // Wait for every mutation that entered in an epoch <= gen to leave.
  while (!wait_writes_left(gen, std::chrono::hours(1))) {
  }
  // The files under reset_mu_: a check meanwhile would take a generation
  // taken out but not yet unlinked for damage.
  std::lock_guard<std::mutex> files(reset_mu_);
  std::vector<std::shared_ptr<Generation>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto keep = std::stable_partition(frozen_.begin(), frozen_.end(),
                                      [&](const auto& g) { return g->number > gen; });
    dropped.assign(keep, frozen_.end());
    frozen_.erase(keep, frozen_.end());
    ever_retired_ = true;
    retired_through_ = std::max(retired_through_, gen);
  }
  // The marker first: once a generation is gone, "never retired" must not come
  // back. Replaced by rename, never rewritten in place: a power cut must not
  // leave it empty (read as "retired through 0", a history that looks whole).
  Status st = replace_file(kRetiredFile, std::to_string(gen) + "\n");
  if (!st.ok()) return st;
  for (const auto& g : dropped) {
    if (g->detached) continue;  // its file is gone, or is not its any more
    if (unlink(g->path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "unlink " + g->path);
    }
  }
  return FsyncDir(dir_fd_.get(), dir_);
}

Status ChangeTracker::grow(uint64_t new_disk_size) {
  uint64_t nb = (new_disk_size + granularity_ - 1) / granularity_;
  if (nb > SparseBitmap::kMaxBits) return Status::InvalidArgument("disk too large for tracking");
  std::lock_guard<std::mutex> lock(mu_);
  if (nb <= nblocks_.load()) return Status::Ok();
  // Room for the new blocks' marks first (see Preallocate): a full state
  // filesystem fails the resize, not a later guest write.
  std::vector<Generation*> gens = {active_.get(), next_.get()};
  for (auto& g : frozen_) gens.push_back(g.get());
  for (Generation* g : gens) {
    if (!g) continue;
    Status st = Preallocate(g->fd.get(), g->path, nb);
    if (!st.ok()) return st;
    g->min_size = AllocatedBytes(nb);
  }
  nblocks_.store(nb);
  active_->bits.resize(nb);
  if (next_) next_->bits.resize(nb);
  for (auto& g : frozen_) g->bits.resize(nb);
  return Status::Ok();
}

size_t ChangeTracker::memory_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = active_->bits.memory_bytes() + (next_ ? next_->bits.memory_bytes() : 0);
  for (const auto& g : frozen_) n += g->bits.memory_bytes();
  return n;
}

}  // namespace rpoint
