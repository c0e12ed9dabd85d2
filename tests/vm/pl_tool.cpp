// pl_tool: the guest side of tests/vm/power-loss (runs inside the VM, under
// the lane's /init). Two modes:
//
//   pl_tool write ...  writes stamped 4 KiB blocks to the disks over NBD in
//                      batches, flushes now and then, cuts restore points
//                      while writing (spawns the rpoint CLI), and reports every
//                      step on a record line *before* (S, P start) or *after*
//                      (F, P done) it happens, drained to the host's serial
//                      port (tcdrain) so it survives the power cut. Runs until
//                      the host kills the VM.
//   pl_tool check ...  after a reboot: reads the live disks and the restore
//                      points the previous boot made, checks them against the
//                      record of every boot so far, cuts the next incremental
//                      point and checks it equals the disks byte for byte.
//                      Saves what the disks held (the next boot's baseline).
//
// Deterministic writes: batch j of boot n writes K distinct blocks per disk,
// chosen by a PRNG seeded from (seed, boot, batch, disk); write i of it carries
// seq = boot<<40 | batch<<12 | i. So the record holds only batch numbers, and
// any seq read back names the one write it came from (or is garbage).
// Stamp format: tests/integration/rp_load.py's (magic, disk, block, seq, fill).
//
// Timing flags of write mode (the host picks them per boot): --flush-pct,
// --point-every, --stop-flush-at-point, --pause-during-point (tests/vm/README.md).
//
// Single-threaded; one libnbd handle per disk.
#include <fcntl.h>
#include <libnbd.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

extern char** environ;

namespace {

constexpr uint32_t kBlock = 4096;
constexpr char kMagic[8] = {'R', 'P', 'S', 'T', 'A', 'M', 'P', '1'};

[[noreturn]] void Die(const std::string& msg) {
  fprintf(stderr, "pl_tool: %s\n", msg.c_str());
  exit(2);
}

uint64_t SplitMix(uint64_t* s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t Seq(uint64_t boot, uint64_t batch, uint64_t i) {
  return boot << 40 | batch << 12 | i;
}

void Stamp(uint32_t disk, uint32_t block, uint64_t seq, unsigned char* out) {
  memcpy(out, kMagic, 8);
  memcpy(out + 8, &disk, 4);
  memcpy(out + 12, &block, 4);
  memcpy(out + 16, &seq, 8);
  uint64_t fill = (seq * 0x9E3779B97F4A7C15ull) ^ (uint64_t{block} << 8) ^ disk;
  for (uint32_t off = 24; off + 8 <= kBlock; off += 8) memcpy(out + off, &fill, 8);
}

struct Options {
  std::string mode;
  std::string nbd_sock;
  std::string rpoint;  // path of the rpoint CLI
  std::string control_sock;
  std::string collection = "c";
  std::vector<std::string> disks;
  uint32_t blocks = 4096;  // per disk, all written
  uint32_t batch = 32;     // writes per disk per batch
  uint64_t seed = 1;
  uint64_t boot = 1;
  std::string record;                // write: where record lines go; check: the record file
  int flush_pct = 30;                // write: chance to flush after a batch
  bool stop_flush_at_point = false;  // write: no flush from 2 batches before the first point
  bool pause_during_point = false;   // write: no writes while a point runs
  int point_every = 6;               // write: batches between points
  std::string baseline;              // check: file of the previous boot's disks; write it anew
  std::string new_baseline;
  std::string succeeded;   // check: file listing Succeeded points, one a line
  std::string next_point;  // check: name of the incremental point to cut now
};

// The K distinct blocks of (boot, batch, disk).
std::vector<uint32_t> BatchBlocks(const Options& o, uint64_t boot, uint64_t batch, uint32_t disk) {
  uint64_t s = o.seed ^ (boot << 44) ^ (batch << 8) ^ disk;
  std::vector<uint32_t> out;
  std::set<uint32_t> seen;
  while (out.size() < o.batch) {
    uint32_t b = static_cast<uint32_t>(SplitMix(&s) % o.blocks);
    if (seen.insert(b).second) out.push_back(b);
  }
  return out;
}

// ---- NBD helpers ----

nbd_handle* Connect(const Options& o, const std::string& exp) {
  nbd_handle* h = nbd_create();
  if (!h) Die(nbd_get_error());
  std::string uri = "nbd+unix:///" + exp + "?socket=" + o.nbd_sock;
  if (nbd_connect_uri(h, uri.c_str()) == -1) {
    std::string e = std::string("connect ") + uri + ": " + nbd_get_error();
    nbd_close(h);
    Die(e);
  }
  return h;
}

// Waits until no handle has a command in flight.
void Drain(const std::vector<nbd_handle*>& hs) {
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<nbd_handle*> who;
    for (nbd_handle* h : hs) {
      if (nbd_aio_in_flight(h) <= 0) continue;
      unsigned dir = nbd_aio_get_direction(h);
      short ev = 0;
      if (dir & LIBNBD_AIO_DIRECTION_READ) ev |= POLLIN;
      if (dir & LIBNBD_AIO_DIRECTION_WRITE) ev |= POLLOUT;
      fds.push_back({nbd_aio_get_fd(h), ev, 0});
      who.push_back(h);
    }
    if (fds.empty()) return;
    if (poll(fds.data(), fds.size(), 1000) < 0 && errno != EINTR) Die("poll");
    for (size_t i = 0; i < fds.size(); i++) {
      int r = 0;
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR))
        r = nbd_aio_notify_read(who[i]);
      else if (fds[i].revents & POLLOUT)
        r = nbd_aio_notify_write(who[i]);
      if (r == -1) Die(std::string("nbd: ") + nbd_get_error());
    }
  }
}

int CheckErr(void* user, int* error) {
  if (*error != 0) {
    fprintf(stderr, "pl_tool: NBD command failed: %s\n", strerror(*error));
    *static_cast<int*>(user) += 1;
  }
  return 1;  // auto-retire
}

std::vector<unsigned char> ReadAll(const Options& o, const std::string& exp) {
  nbd_handle* h = Connect(o, exp);
  int64_t size = nbd_get_size(h);
  uint64_t want = uint64_t{o.blocks} * kBlock;
  if (size < 0 || static_cast<uint64_t>(size) < want) Die("export " + exp + " too small");
  std::vector<unsigned char> data(want);
  for (uint64_t off = 0; off < want; off += 1 << 20) {
    uint64_t n = std::min<uint64_t>(1 << 20, want - off);
    if (nbd_pread(h, data.data() + off, n, off, 0) == -1)
      Die("read " + exp + ": " + nbd_get_error());
  }
  nbd_shutdown(h, 0);
  nbd_close(h);
  return data;
}

// ---- the record ----

class Recorder {
 public:
  explicit Recorder(const std::string& path) {
    fd_ = open(path.c_str(), O_WRONLY | O_NOCTTY | O_APPEND | O_CLOEXEC);
    if (fd_ < 0) Die("open " + path + ": " + strerror(errno));
    tty_ = isatty(fd_);
    if (tty_) {
      termios t{};
      if (tcgetattr(fd_, &t) == 0) {
        cfmakeraw(&t);
        cfsetospeed(&t, B115200);
        tcsetattr(fd_, TCSANOW, &t);
      }
    }
  }
  // Returns once the line left the guest (serial: transmitter empty).
  void Line(const std::string& s) {
    std::string l = s + "\n";
    size_t off = 0;
    while (off < l.size()) {
      ssize_t n = write(fd_, l.data() + off, l.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) Die("record write");
      off += n;
    }
    if (tty_)
      tcdrain(fd_);
    else
      fdatasync(fd_);
  }

 private:
  int fd_;
  bool tty_;
};

// ---- write mode ----

int RunWrite(const Options& o) {
  Recorder rec(o.record);
  std::vector<nbd_handle*> hs;
  for (auto& d : o.disks) hs.push_back(Connect(o, d));
  std::vector<unsigned char> buf(size_t{o.batch} * hs.size() * kBlock);
  uint64_t rng = o.seed ^ (o.boot * 0x51ED27u);
  pid_t child = -1;
  std::string child_name;
  int points = 0;
  bool flushing = true;
  int errors = 0;
  rec.Line("W " + std::to_string(o.boot) + " start");
  for (uint64_t batch = 0;; batch++) {
    if (batch >= (1u << 28)) Die("too many batches");
    // --pause-during-point: the point's copy-out sees the disks quiet, and no
    // later write re-marks (and so re-copies) what it copied.
    while (o.pause_during_point && child > 0) {
      siginfo_t si{};
      if (waitid(P_PID, child, &si, WEXITED | WNOHANG | WNOWAIT) != 0 || si.si_pid != 0) break;
      usleep(10000);
    }
    // Between batches: has the point finished? Then every later batch is
    // submitted after it was observed done.
    if (child > 0) {
      int st = 0;
      pid_t r = waitpid(child, &st, WNOHANG);
      if (r == child) {
        int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        rec.Line("P " + std::to_string(o.boot) + " " + child_name + " done " +
                 std::to_string(batch - 1) + " " + std::to_string(rc));
        child = -1;
      }
    }
    if (child < 0 && batch > 0 && batch % o.point_every == 0) {
      child_name = "b" + std::to_string(o.boot) + "p" + std::to_string(points++);
      // Every batch < `batch` is acknowledged: they are in the point.
      rec.Line("P " + std::to_string(o.boot) + " " + child_name + " start " +
               std::to_string(batch - 1));
      std::string target = o.collection + "/" + child_name;
      const char* argv[] = {o.rpoint.c_str(), "--socket", o.control_sock.c_str(),
                            "restore-point",  "create",   target.c_str(),
                            "--wait",         nullptr};
      if (posix_spawn(&child, o.rpoint.c_str(), nullptr, nullptr, const_cast<char**>(argv),
                      environ) != 0)
        Die("spawn rpoint");
    }
    rec.Line("S " + std::to_string(o.boot) + " " + std::to_string(batch));
    for (uint32_t d = 0; d < hs.size(); d++) {
      auto blocks = BatchBlocks(o, o.boot, batch, d);
      for (uint32_t i = 0; i < o.batch; i++) {
        unsigned char* p = buf.data() + (size_t{d} * o.batch + i) * kBlock;
        Stamp(d, blocks[i], Seq(o.boot, batch, i), p);
        if (nbd_aio_pwrite(hs[d], p, kBlock, uint64_t{blocks[i]} * kBlock,
                           nbd_completion_callback{CheckErr, &errors, nullptr}, 0) == -1)
          Die(std::string("pwrite: ") + nbd_get_error());
      }
    }
    Drain(hs);
    if (errors) Die("writes failed");
    // --stop-flush-at-point: the last two batches before the first point, and
    // everything after, stay unflushed: the point copies them from the page cache.
    if (o.stop_flush_at_point && batch + 2 >= static_cast<uint64_t>(o.point_every))
      flushing = false;
    if (flushing && static_cast<int>(SplitMix(&rng) % 100) < o.flush_pct) {
      for (nbd_handle* h : hs)
        if (nbd_aio_flush(h, nbd_completion_callback{CheckErr, &errors, nullptr}, 0) == -1)
          Die(std::string("flush: ") + nbd_get_error());
      Drain(hs);
      if (errors) Die("flush failed");
      rec.Line("F " + std::to_string(o.boot) + " " + std::to_string(batch));
    }
  }
}

// ---- check mode ----

struct BootRecord {
  int64_t max_submitted = -1;
  int64_t max_flushed = -1;
  struct Point {
    int64_t start = -1;  // batches <= start were acked before the point began
    int64_t done = -1;   // batches > done were submitted after it was seen done; -1: unknown
  };
  std::map<std::string, Point> points;
};

std::map<uint64_t, BootRecord> ReadRecord(const std::string& path) {
  std::map<uint64_t, BootRecord> r;
  std::ifstream f(path);
  if (!f) Die("cannot read record " + path);
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ss(line);
    std::string kind;
    uint64_t boot;
    if (!(ss >> kind >> boot)) continue;  // boot noise, partial line
    BootRecord& b = r[boot];
    if (kind == "S" || kind == "F") {
      int64_t n;
      if (!(ss >> n)) continue;
      (kind == "S" ? b.max_submitted : b.max_flushed) = n;
    } else if (kind == "P") {
      std::string name, what;
      int64_t n;
      if (!(ss >> name >> what >> n)) continue;
      if (what == "start") b.points[name].start = n;
      if (what == "done") b.points[name].done = n;
    }
  }
  return r;
}

class Checker {
 public:
  Checker(const Options& o) : o_(o), rec_(ReadRecord(o.record)) {}

  int Run() {
    size_t nd = o_.disks.size();
    // Durable lower bound per block, over the whole history (boots in order).
    std::vector<std::vector<uint64_t>> lo(nd, std::vector<uint64_t>(o_.blocks, 0));
    uint64_t acked_checked = 0;
    for (auto& [boot, br] : rec_) {
      for (int64_t j = 0; j <= br.max_flushed; j++)
        for (uint32_t d = 0; d < nd; d++) {
          auto blocks = BatchBlocks(o_, boot, j, d);
          for (uint32_t i = 0; i < o_.batch; i++) lo[d][blocks[i]] = Seq(boot, j, i);
          if (boot == o_.boot - 1) acked_checked += o_.batch;
        }
    }
    // 1. The live disks: every write acked before a completed flush is there.
    std::vector<std::vector<uint64_t>> live(nd);
    std::vector<std::vector<unsigned char>> live_raw(nd);
    for (uint32_t d = 0; d < nd; d++) {
      live_raw[d] = ReadAll(o_, o_.disks[d]);
      live[d] = Parse(d, live_raw[d], "disk " + o_.disks[d]);
      for (uint32_t b = 0; b < o_.blocks; b++)
        if (live[d][b] != kBad && live[d][b] < lo[d][b])
          Problem("disk " + o_.disks[d] + " block " + std::to_string(b) + ": holds " +
                  SeqText(live[d][b]) + ", older than " + SeqText(lo[d][b]) +
                  " acknowledged after a completed flush");
    }
    // 2. The points of the previous boot that say Succeeded.
    int points_checked = 0;
    std::set<std::string> succeeded = ReadLines(o_.succeeded);
    if (o_.boot > 1) {
      uint64_t pb = o_.boot - 1;
      std::vector<std::vector<uint64_t>> base = ReadBaseline(nd);
      for (const std::string& name : succeeded) {
        std::string prefix = "b" + std::to_string(pb) + "p";
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        auto it = rec_[pb].points.find(name);
        if (it == rec_[pb].points.end() || it->second.start < 0) {
          Problem("point " + name + " Succeeded but the record never saw it start");
          continue;
        }
        CheckPoint(pb, name, it->second, base);
        points_checked++;
      }
    }
    // 3. The next incremental point, no writes since the reboot: equals the disks.
    if (!o_.next_point.empty()) {
      std::string cmd = o_.rpoint + " --socket " + o_.control_sock + " restore-point create " +
                        o_.collection + "/" + o_.next_point + " --wait >/dev/null";
      if (system(cmd.c_str()) != 0) {
        Problem("restore point " + o_.next_point + " did not succeed");
      } else {
        points_checked++;
        for (uint32_t d = 0; d < nd; d++) {
          std::string exp = o_.collection + "/" + o_.next_point + "/" + o_.disks[d];
          auto pt = ReadAll(o_, exp);
          int shown = 0;
          for (uint32_t b = 0; b < o_.blocks; b++) {
            if (memcmp(pt.data() + size_t{b} * kBlock, live_raw[d].data() + size_t{b} * kBlock,
                       kBlock) == 0)
              continue;
            std::vector<unsigned char> one(pt.begin() + size_t{b} * kBlock,
                                           pt.begin() + size_t{b + 1} * kBlock);
            uint64_t ps = ParseOne(d, b, one.data());
            if (shown++ < 8)
              Problem("point " + exp + " block " + std::to_string(b) + ": holds " + SeqText(ps) +
                      ", the disk " + SeqText(live[d][b]) +
                      " (incremental point right after the reboot differs from the disk)");
            else
              divergences_++;
          }
        }
      }
    }
    // The disks as this boot found them: the baseline of this boot's points.
    if (!o_.new_baseline.empty()) {
      std::string tmp = o_.new_baseline + ".tmp";
      FILE* f = fopen(tmp.c_str(), "w");
      if (!f) Die("write " + tmp);
      for (uint32_t d = 0; d < nd; d++) fwrite(live[d].data(), 8, o_.blocks, f);
      if (fflush(f) != 0 || fdatasync(fileno(f)) != 0) Die("sync " + tmp);
      fclose(f);
      if (rename(tmp.c_str(), o_.new_baseline.c_str()) != 0) Die("rename baseline");
      int dir = open(DirOf(o_.new_baseline).c_str(), O_RDONLY | O_DIRECTORY);
      if (dir >= 0) {
        fsync(dir);
        close(dir);
      }
    }
    printf("CHECK boot=%" PRIu64 " acked=%" PRIu64 " points=%d divergences=%d\n", o_.boot,
           acked_checked, points_checked, divergences_);
    return divergences_ ? 1 : 0;
  }

 private:
  static constexpr uint64_t kBad = ~uint64_t{0};

  void Problem(const std::string& s) {
    divergences_++;
    printf("DIVERGENCE boot=%" PRIu64 " %s\n", o_.boot, s.c_str());
  }

  static std::string SeqText(uint64_t s) {
    if (s == kBad) return "garbage";
    if (s == 0) return "zeroes";
    return "boot " + std::to_string(s >> 40) + " batch " + std::to_string((s >> 12) & 0xFFFFFFF) +
           " write " + std::to_string(s & 0xFFF);
  }

  static std::string DirOf(const std::string& p) {
    size_t s = p.rfind('/');
    return s == std::string::npos ? "." : (s == 0 ? "/" : p.substr(0, s));
  }

  static std::set<std::string> ReadLines(const std::string& path) {
    std::set<std::string> out;
    if (path.empty()) return out;
    std::ifstream f(path);
    std::string l;
    while (std::getline(f, l))
      if (!l.empty()) out.insert(l);
    return out;
  }

  // seq of a block, 0 for zeroes, kBad (and a problem) for anything that is not
  // a whole stamp of a write the record says was issued to this very block.
  uint64_t ParseOne(uint32_t d, uint32_t b, const unsigned char* p) {
    static const std::vector<unsigned char> zero(kBlock, 0);
    if (memcmp(p, zero.data(), kBlock) == 0) return 0;
    uint32_t dd, bb;
    uint64_t seq;
    memcpy(&dd, p + 8, 4);
    memcpy(&bb, p + 12, 4);
    memcpy(&seq, p + 16, 8);
    unsigned char want[kBlock];
    Stamp(d, b, seq, want);
    if (memcmp(p, want, kBlock) != 0) return kBad;
    uint64_t boot = seq >> 40, batch = (seq >> 12) & 0xFFFFFFF, i = seq & 0xFFF;
    auto it = rec_.find(boot);
    if (it == rec_.end() || static_cast<int64_t>(batch) > it->second.max_submitted ||
        i >= o_.batch || BatchBlocks(o_, boot, batch, d)[i] != b)
      return kBad;
    return seq;
  }

  std::vector<uint64_t> Parse(uint32_t d, const std::vector<unsigned char>& raw,
                              const std::string& what) {
    std::vector<uint64_t> out(o_.blocks);
    for (uint32_t b = 0; b < o_.blocks; b++) {
      out[b] = ParseOne(d, b, raw.data() + size_t{b} * kBlock);
      if (out[b] == kBad)
        Problem(what + " block " + std::to_string(b) + ": torn, misplaced or never-issued data");
    }
    return out;
  }

  std::vector<std::vector<uint64_t>> ReadBaseline(size_t nd) {
    std::vector<std::vector<uint64_t>> base(nd, std::vector<uint64_t>(o_.blocks, 0));
    if (o_.baseline.empty()) return base;
    FILE* f = fopen(o_.baseline.c_str(), "r");
    if (!f) return base;  // the first boot: the disks were new, all zeroes
    for (size_t d = 0; d < nd; d++)
      if (fread(base[d].data(), 8, o_.blocks, f) != o_.blocks) Die("short baseline");
    fclose(f);
    return base;
  }

  // A point of boot pb: each block holds what the boot found there (baseline) or
  // a later write of that boot, no older than the last one acknowledged before
  // the point began, and none submitted after it was seen done.
  void CheckPoint(uint64_t pb, const std::string& name, const BootRecord::Point& pt,
                  const std::vector<std::vector<uint64_t>>& base) {
    int64_t hi_batch = pt.done >= 0 ? pt.done : rec_[pb].max_submitted;
    for (uint32_t d = 0; d < o_.disks.size(); d++) {
      std::string exp = o_.collection + "/" + name + "/" + o_.disks[d];
      auto raw = ReadAll(o_, exp);
      std::vector<uint64_t> lo = base[d];
      std::vector<std::set<uint64_t>> ok(o_.blocks);
      for (uint32_t b = 0; b < o_.blocks; b++) ok[b].insert(base[d][b]);
      for (int64_t j = 0; j <= hi_batch; j++) {
        auto blocks = BatchBlocks(o_, pb, j, d);
        for (uint32_t i = 0; i < o_.batch; i++) {
          uint64_t s = Seq(pb, j, i);
          ok[blocks[i]].insert(s);
          if (j <= pt.start) lo[blocks[i]] = s;
        }
      }
      for (uint32_t b = 0; b < o_.blocks; b++) {
        uint64_t v = ParseOne(d, b, raw.data() + size_t{b} * kBlock);
        std::string where = "point " + exp + " block " + std::to_string(b) + ": ";
        if (v == kBad)
          Problem(where + "torn, misplaced or never-issued data");
        else if (!ok[b].count(v) || v < lo[b])
          Problem(where + "holds " + SeqText(v) + ", expected the disk's " + SeqText(lo[b]) +
                  " or a write in flight across the cut");
      }
    }
  }

  const Options& o_;
  std::map<uint64_t, BootRecord> rec_;
  int divergences_ = 0;
};

Options ParseArgs(int argc, char** argv) {
  Options o;
  if (argc < 2) Die("usage: pl_tool write|check --opt value ...");
  o.mode = argv[1];
  for (int i = 2; i < argc; i++) {
    std::string k = argv[i];
    if (k == "--stop-flush-at-point") {
      o.stop_flush_at_point = true;
      continue;
    }
    if (k == "--pause-during-point") {
      o.pause_during_point = true;
      continue;
    }
    if (i + 1 >= argc) Die("missing value for " + k);
    std::string v = argv[++i];
    if (k == "--nbd")
      o.nbd_sock = v;
    else if (k == "--control")
      o.control_sock = v;
    else if (k == "--rpoint")
      o.rpoint = v;
    else if (k == "--collection")
      o.collection = v;
    else if (k == "--disk")
      o.disks.push_back(v);
    else if (k == "--blocks")
      o.blocks = std::stoul(v);
    else if (k == "--batch")
      o.batch = std::stoul(v);
    else if (k == "--seed")
      o.seed = std::stoull(v);
    else if (k == "--boot")
      o.boot = std::stoull(v);
    else if (k == "--record")
      o.record = v;
    else if (k == "--flush-pct")
      o.flush_pct = std::stoi(v);
    else if (k == "--point-every")
      o.point_every = std::stoi(v);
    else if (k == "--baseline")
      o.baseline = v;
    else if (k == "--new-baseline")
      o.new_baseline = v;
    else if (k == "--succeeded")
      o.succeeded = v;
    else if (k == "--next-point")
      o.next_point = v;
    else
      Die("unknown option " + k);
  }
  if (o.disks.empty() || o.nbd_sock.empty() || o.record.empty())
    Die("need --disk, --nbd, --record");
  if (o.batch == 0 || o.batch > 4096 || o.batch > o.blocks) Die("bad --batch");
  if (o.point_every < 1) Die("bad --point-every");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  Options o = ParseArgs(argc, argv);
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (o.mode == "write") return RunWrite(o);
  if (o.mode == "check") return Checker(o).Run();
  Die("unknown mode " + o.mode);
}
