// store_scale: the restore point store at disk scale.
//
// A 1 TiB sparse disk (64 KiB chunks, 16M slots) gets a base point with some
// scattered data, then an incremental point that changes 1 GiB. What the
// incremental point costs (wall time, bytes written, pages written, peak
// memory) must follow the 1 GiB, not the 1 TiB. Then: reading the changed data
// back, verify of the new point, delete the base + GC.
//
//   store_scale [--dir DIR] [--disk-gib 1024] [--changed-mib 1024] [--base-mib 256]
//               [--chunk-kib 64] [--threads 2] [--pattern random|runs] [--keep]
//
// Numbers printed are for this machine; see docs/store.md for recorded runs.
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "store/digest.h"
#include "store/point_reader.h"
#include "store/point_writer.h"
#include "store/store.h"

using namespace rpoint;
using namespace rpoint::store;

namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

void Fill(char* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
}

uint64_t ProcValue(const char* file, const char* key) {
  std::ifstream f(file);
  std::string line;
  size_t klen = std::strlen(key);
  while (std::getline(f, line)) {
    if (line.compare(0, klen, key) == 0) return std::strtoull(line.c_str() + klen, nullptr, 10);
  }
  return 0;
}
double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}
uint64_t PeakRssKiB() {
  return ProcValue("/proc/self/status", "VmHWM:");
}
uint64_t RssKiB() {
  return ProcValue("/proc/self/status", "VmRSS:");
}
uint64_t WriteBytes() {
  return ProcValue("/proc/self/io", "write_bytes: ");
}
void ResetPeakRss() {
  std::ofstream("/proc/self/clear_refs") << "5";
}

uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) total += e.file_size();
  }
  return total;
}

template <typename T>
T Must(Result<T> r, const char* what) {
  if (!r.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, r.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(r).value();
}
void Must(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

double MiB(uint64_t b) {
  return double(b) / (1 << 20);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  uint64_t disk_gib = 1024, changed_mib = 1024, base_mib = 256, chunk_kib = 64;
  unsigned threads = 2;
  std::string pattern = "random";
  bool keep = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--dir")
      dir = next();
    else if (a == "--disk-gib")
      disk_gib = std::stoull(next());
    else if (a == "--changed-mib")
      changed_mib = std::stoull(next());
    else if (a == "--base-mib")
      base_mib = std::stoull(next());
    else if (a == "--chunk-kib")
      chunk_kib = std::stoull(next());
    else if (a == "--threads")
      threads = unsigned(std::stoul(next()));
    else if (a == "--pattern")
      pattern = next();
    else if (a == "--keep")
      keep = true;
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  spdlog::set_level(spdlog::level::warn);
  bool own_dir = dir.empty();
  if (own_dir) {
    const char* t = std::getenv("TMPDIR");
    std::string tmpl = std::string(t && *t ? t : "/var/tmp") + "/store_scale.XXXXXX";
    if (!::mkdtemp(tmpl.data())) return 1;
    dir = tmpl;
  }
  const uint32_t cs = uint32_t(chunk_kib * 1024);
  const uint64_t size = disk_gib << 30;
  const uint64_t slots = size / cs;
  const uint64_t changed = (changed_mib << 20) / cs;
  const uint64_t base_n = (base_mib << 20) / cs;
  std::printf("disk %" PRIu64 " GiB, chunk %u KiB, %" PRIu64 " slots; base %" PRIu64
              " MiB, change %" PRIu64 " MiB (%s), %u put threads\n",
              disk_gib, cs / 1024, slots, base_mib, changed_mib, pattern.c_str(), threads);

  // Raw hashing speed, one core.
  {
    std::vector<char> buf(cs);
    Fill(buf.data(), cs, 1);
    auto t = Clock::now();
    uint64_t n = (256u << 20) / cs;
    for (uint64_t i = 0; i < n; ++i) {
      buf[0] = char(i);
      (void)Sha256(buf.data(), cs);
    }
    std::printf("sha256 (one core): %.0f MB/s\n", double(n * cs) / Since(t) / 1e6);
  }

  StoreOptions so;
  so.dir = dir + "/region";
  auto st = Must(Store::Open(so), "open");

  // Slots of the base and of the change.
  std::mt19937_64 rng(42);
  std::vector<uint64_t> base_slots(base_n), change_slots;
  for (auto& s : base_slots) s = rng() % slots;
  if (pattern == "runs") {
    // 1 MiB-aligned runs of 16 slots, scattered: what a VM's writes look like.
    const uint64_t run = std::max<uint64_t>(1, (1u << 20) / cs);
    while (change_slots.size() < changed) {
      uint64_t start = (rng() % (slots / run)) * run;
      for (uint64_t k = 0; k < run && change_slots.size() < changed; ++k) {
        change_slots.push_back(start + k);
      }
    }
  } else {
    change_slots.resize(changed);
    for (auto& s : change_slots) s = rng() % slots;
  }

  auto write_point = [&](PointId parent, const std::vector<uint64_t>& which, uint64_t seed) {
    PointParams p;
    p.parent = parent;
    p.size = size;
    p.chunk_size = cs;
    auto w = Must(st->begin_point(p), "begin_point");
    std::atomic<size_t> next{0};
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) {
      ts.emplace_back([&] {
        std::vector<char> buf(cs);
        for (size_t i; (i = next.fetch_add(1)) < which.size();) {
          Fill(buf.data(), cs, seed + which[i]);
          Must(w->put(which[i], buf.data(), cs), "put");
        }
      });
    }
    for (auto& t : ts) t.join();
    return Must(w->commit(), "commit");
  };

  auto t0 = Clock::now();
  auto base = write_point(0, base_slots, 0);
  std::printf("base point: %.2fs, %" PRIu64 " chunks, %" PRIu64 " pages, pack bytes %.1f MiB\n",
              Since(t0), base.new_chunks, base.new_pages, MiB(DirBytes(so.dir + "/packs")));

  // The incremental point: the measurement that matters.
  uint64_t packs_before = DirBytes(so.dir + "/packs");
  uint64_t region_before = DirBytes(so.dir);
  uint64_t wb_before = WriteBytes();
  uint64_t rss_before = RssKiB();
  ResetPeakRss();
  double cpu0 = CpuSeconds();
  t0 = Clock::now();
  auto inc = write_point(base.id, change_slots, 1'000'000'000);
  double inc_s = Since(t0);
  double inc_cpu = CpuSeconds() - cpu0;
  uint64_t peak = PeakRssKiB();
  uint64_t wb = WriteBytes() - wb_before;
  uint64_t packs_delta = DirBytes(so.dir + "/packs") - packs_before;
  uint64_t region_delta = DirBytes(so.dir) - region_before;
  std::printf(
      "incremental point: %.2fs (%.0f MB/s of changed data), CPU %.2fs (incl. generating data)\n"
      "  new chunks %" PRIu64 " (%.1f MiB), new pages %" PRIu64 " (%.1f MiB), slots put %" PRIu64
      "\n  pack bytes +%.1f MiB, region bytes +%.1f MiB, bytes written by the process %.1f MiB\n"
      "  peak RSS %.1f MiB (RSS before %.1f MiB; peak above it %.1f MiB)\n"
      "  (a flat digest-per-slot index of this disk alone would be %.1f MiB)\n",
      inc_s, double(changed * cs) / inc_s / 1e6, inc_cpu, inc.new_chunks, MiB(inc.new_chunk_bytes),
      inc.new_pages, MiB(inc.new_pages * kPageBytes), inc.put_slots, MiB(packs_delta),
      MiB(region_delta), MiB(wb), peak / 1024.0, rss_before / 1024.0,
      (double(peak) - double(rss_before)) / 1024.0, MiB(slots * 32));

  // Read the changed data back through a reader (sorted: a restore's order).
  {
    auto r = Must(st->open_point(inc.id), "open_point");
    std::vector<uint64_t> sorted = change_slots;
    std::sort(sorted.begin(), sorted.end());
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
    std::vector<char> got(cs), want(cs);
    t0 = Clock::now();
    uint64_t bad = 0;
    for (uint64_t s : sorted) {
      Must(r->read(s * cs, cs, got.data()), "read");
      Fill(want.data(), cs, 1'000'000'000 + s);
      if (got != want) ++bad;
    }
    double rs = Since(t0);
    std::printf("read back %zu changed chunks: %.2fs (%.0f MB/s), %" PRIu64 " mismatches\n",
                sorted.size(), rs, double(sorted.size() * cs) / rs / 1e6, bad);
    t0 = Clock::now();
    auto ex = Must(r->extents(0, size), "extents");
    std::printf("extents of the whole disk: %zu runs in %.3fs\n", ex.size(), Since(t0));
    if (bad) return 1;
  }

  t0 = Clock::now();
  auto rep = Must(st->verify(inc.id), "verify");
  double vs = Since(t0);
  std::printf("verify incremental point: %.2fs, %" PRIu64 " pages + %" PRIu64
              " chunks, %.1f MiB re-read (%.0f MB/s), %s\n",
              vs, rep.pages_checked, rep.chunks_checked, MiB(rep.bytes_read),
              double(rep.bytes_read) / vs / 1e6, rep.ok() ? "clean" : "DAMAGED");

  Must(st->delete_point(base.id), "delete base");
  t0 = Clock::now();
  auto g = Must(st->collect_garbage(), "gc");
  std::printf("delete base + GC: %.2fs, %" PRIu64 " pages walked, %" PRIu64
              " objects scanned, %" PRIu64 " deleted, %" PRIu64 " packs deleted, %" PRIu64
              " rewritten, packs %.1f -> %.1f MiB\n",
              Since(t0), g.pages_walked, g.objects_scanned, g.objects_deleted, g.packs_deleted,
              g.packs_repacked, MiB(g.pack_bytes_before), MiB(g.pack_bytes_after));

  st.reset();
  if (own_dir && !keep) std::filesystem::remove_all(dir);
  return rep.ok() ? 0 : 1;
}
