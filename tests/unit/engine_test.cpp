// Unit tests for the disk engine: Reactor / ReactorPool (engine/reactor.h) and
// FileDisk (engine/file_disk.h), driven through a real io_uring on a real file.
//
// Temp files live under $TMPDIR (default /var/tmp, not /tmp, which may be a
// tmpfs without O_DIRECT or hole reporting on older kernels).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "common/thread_role.h"
#include "engine/block_device.h"
#include "engine/file_disk.h"
#include "engine/reactor.h"

namespace rpoint {
namespace {

using namespace std::chrono_literals;
constexpr auto kTimeout = 20s;  // far above any real completion time; catches hangs

// Fails the whole run rather than unwinding while the engine may still own a request.
void die_if(bool cond, const char* what) {
  if (cond) {
    std::fprintf(stderr, "engine_test: fatal: %s\n", what);
    std::abort();
  }
}

// A Reactor whose loop runs on its own thread for the life of the object.
class LoopThread {
 public:
  explicit LoopThread(unsigned queue_depth = 64) {
    auto r = Reactor::Create("test", queue_depth);
    die_if(!r.ok(), "Reactor::Create failed");
    reactor_ = std::move(r).value();
    thread_ = std::thread([this] { reactor_->run(); });
  }
  ~LoopThread() {
    reactor_->stop();
    thread_.join();
  }
  Reactor& reactor() { return *reactor_; }

  // Runs fn on the loop thread and waits for it to return.
  void call(std::function<void()> fn) {
    std::promise<void> done;
    reactor_->post([&] {
      fn();
      done.set_value();
    });
    die_if(done.get_future().wait_for(kTimeout) != std::future_status::ready, "post() never ran");
  }

 private:
  std::unique_ptr<Reactor> reactor_;
  std::thread thread_;
};

// Set while FileDisk::submit() runs on the loop thread: on_done() must never see it.
thread_local bool t_in_submit = false;

// An IoRequest the test thread can wait for.
class TestIo final : public IoRequest {
 public:
  TestIo(IoKind k, uint64_t off, uint64_t len, char* b = nullptr, uint32_t f = 0) {
    kind = k;
    offset = off;
    length = len;
    buf = b;
    flags = f;
  }
  void on_done(int result) override {
    inside_submit = t_in_submit;
    on_loop_thread = reactor != nullptr && reactor->in_loop_thread();
    ++calls;
    result_.set_value(result);
  }
  // Waits for the completion and returns its result (0 or -errno).
  int wait() {
    auto f = result_.get_future();
    die_if(f.wait_for(kTimeout) != std::future_status::ready, "I/O never completed");
    return f.get();
  }

  Reactor* reactor = nullptr;
  bool inside_submit = false;
  bool on_loop_thread = false;
  std::atomic<int> calls{0};

 private:
  std::promise<int> result_;
};

void submit(LoopThread& loop, BlockDevice& dev, TestIo& io) {
  io.reactor = &loop.reactor();
  loop.call([&] {
    t_in_submit = true;
    dev.submit(loop.reactor(), io);
    t_in_submit = false;
  });
}

// Submits one request and waits for its result.
int run_io(LoopThread& loop, BlockDevice& dev, IoKind kind, uint64_t off, uint64_t len,
           char* buf = nullptr, uint32_t flags = 0) {
  TestIo io(kind, off, len, buf, flags);
  submit(loop, dev, io);
  int rc = io.wait();
  CHECK_MESSAGE(!io.inside_submit, "on_done ran inside submit()");
  CHECK_MESSAGE(io.on_loop_thread, "on_done ran off the submitting reactor's thread");
  CHECK(io.calls.load() == 1);
  return rc;
}

// Page-aligned heap buffer (O_DIRECT needs aligned memory); freed by RAII.
struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using AlignedBuf = std::unique_ptr<char[], FreeDeleter>;
AlignedBuf aligned_buf(size_t len) {
  void* p = nullptr;
  die_if(posix_memalign(&p, 4096, std::max<size_t>(len, 4096) + 4096) != 0, "posix_memalign");
  return AlignedBuf(static_cast<char*>(p));
}

void fill_pattern(char* p, size_t len, uint32_t seed) {
  std::mt19937 rng(seed);
  for (size_t i = 0; i < len; ++i) p[i] = static_cast<char>(rng());
}

bool all_zero(const char* p, size_t len) {
  return std::all_of(p, p + len, [](char c) { return c == 0; });
}

// A temp directory with one backing file; removed at the end of the test.
class TempFile {
 public:
  explicit TempFile(uint64_t size) {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/var/tmp") + "/engine_test.XXXXXX";
    std::vector<char> t(tmpl.begin(), tmpl.end());
    t.push_back('\0');
    die_if(mkdtemp(t.data()) == nullptr, "mkdtemp");
    dir_ = t.data();
    path_ = dir_ + "/disk.img";
    UniqueFd fd(::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    die_if(!fd, "create backing file");
    die_if(::ftruncate(fd.get(), static_cast<off_t>(size)) != 0, "ftruncate");
  }
  ~TempFile() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  const std::string& path() const { return path_; }

  // Direct file access, bypassing the engine, to check what really landed.
  std::vector<char> pread(uint64_t off, size_t len) const {
    std::vector<char> out(len);
    UniqueFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    die_if(!fd, "open for pread");
    die_if(::pread(fd.get(), out.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len),
           "pread");
    return out;
  }
  void pwrite(uint64_t off, const char* data, size_t len) const {
    UniqueFd fd(::open(path_.c_str(), O_WRONLY | O_CLOEXEC));
    die_if(!fd, "open for pwrite");
    die_if(::pwrite(fd.get(), data, len, static_cast<off_t>(off)) != static_cast<ssize_t>(len),
           "pwrite");
  }
  uint64_t file_size() const {
    struct stat st {};
    die_if(::stat(path_.c_str(), &st) != 0, "stat");
    return static_cast<uint64_t>(st.st_size);
  }

 private:
  std::string dir_;
  std::string path_;
};

std::shared_ptr<FileDisk> open_disk(const TempFile& f, bool direct = false, bool read_only = false) {
  FileDiskOptions o;
  o.name = "d0";
  o.path = f.path();
  o.direct = direct;
  o.read_only = read_only;
  auto r = FileDisk::Open(o);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return std::move(r).value();
}

// A NOP on the ring, completing into a counter.
class NopOp final : public Reactor::Op {
 public:
  void complete(int res, uint32_t) override {
    if (res != 0) errors.fetch_add(1);
    if (reactor && !reactor->in_loop_thread()) wrong_thread.fetch_add(1);
    if (count.fetch_add(1) + 1 == expected) done.set_value();
  }
  Reactor* reactor = nullptr;
  int expected = 1;
  std::atomic<int> count{0}, errors{0}, wrong_thread{0};
  std::promise<void> done;
};

constexpr uint64_t kMiB = 1 << 20;

}  // namespace

// ---------------------------------------------------------------- Reactor

TEST_SUITE("reactor") {
  TEST_CASE("post() runs every function on the loop thread, in order") {
    auto r = Reactor::Create("t", 32);
    REQUIRE(r.ok());
    Reactor& reactor = *r.value();
    std::vector<int> order;
    std::atomic<int> off_thread{0};
    // Posted before run() starts: must not be lost.
    reactor.post([&] { order.push_back(-1); });
    std::thread loop([&] { reactor.run(); });
    constexpr int kN = 1000;
    std::promise<void> all;
    for (int i = 0; i < kN; ++i) {
      reactor.post([&, i] {
        if (!reactor.in_loop_thread()) off_thread.fetch_add(1);
        order.push_back(i);
        if (i == kN - 1) all.set_value();
      });
    }
    REQUIRE(all.get_future().wait_for(kTimeout) == std::future_status::ready);
    reactor.stop();
    loop.join();
    CHECK(off_thread.load() == 0);
    REQUIRE(order.size() == kN + 1);
    CHECK(order[0] == -1);
    for (int i = 0; i < kN; ++i) CHECK(order[i + 1] == i);
    CHECK_FALSE(reactor.in_loop_thread());
  }

  TEST_CASE("post() is safe from many threads at once") {
    LoopThread loop;
    constexpr int kThreads = 4, kEach = 2000;
    std::atomic<int> ran{0};
    std::promise<void> all;
    std::vector<std::thread> posters;
    for (int t = 0; t < kThreads; ++t) {
      posters.emplace_back([&] {
        for (int i = 0; i < kEach; ++i) {
          loop.reactor().post([&] {
            if (ran.fetch_add(1) + 1 == kThreads * kEach) all.set_value();
          });
        }
      });
    }
    for (auto& t : posters) t.join();
    REQUIRE(all.get_future().wait_for(kTimeout) == std::future_status::ready);
    CHECK(ran.load() == kThreads * kEach);
  }

  TEST_CASE("stop() from another thread makes run() return; a stop before run() is not lost") {
    auto r = Reactor::Create("t", 8);
    REQUIRE(r.ok());
    Reactor& reactor = *r.value();
    auto done = std::async(std::launch::async, [&] { reactor.run(); });
    std::this_thread::sleep_for(20ms);  // let run() block in the ring
    reactor.stop();
    REQUIRE(done.wait_for(kTimeout) == std::future_status::ready);

    auto r2 = Reactor::Create("t2", 8);
    REQUIRE(r2.ok());
    r2.value()->stop();
    auto done2 = std::async(std::launch::async, [&] { r2.value()->run(); });
    REQUIRE(done2.wait_for(kTimeout) == std::future_status::ready);
  }

  TEST_CASE("an SQE from sqe() completes into its Op on the loop thread") {
    LoopThread loop;
    NopOp op;
    op.reactor = &loop.reactor();
    loop.call([&] {
      io_uring_prep_nop(loop.reactor().sqe(&op));
      // A CQE with no Op is ignored, not dereferenced.
      io_uring_prep_nop(loop.reactor().sqe(nullptr));
    });
    REQUIRE(op.done.get_future().wait_for(kTimeout) == std::future_status::ready);
    CHECK(op.errors.load() == 0);
    CHECK(op.wrong_thread.load() == 0);
    CHECK(op.count.load() == 1);
  }

  TEST_CASE("sqe() never fails when the submission queue is full") {
    LoopThread loop(4);  // tiny ring: 4 SQEs
    NopOp op;
    op.reactor = &loop.reactor();
    op.expected = 200;
    loop.call([&] {
      for (int i = 0; i < op.expected; ++i) {
        io_uring_sqe* s = loop.reactor().sqe(&op);
        die_if(s == nullptr, "sqe() returned nullptr");
        io_uring_prep_nop(s);
      }
    });
    REQUIRE(op.done.get_future().wait_for(kTimeout) == std::future_status::ready);
    CHECK(op.count.load() == op.expected);
    CHECK(op.errors.load() == 0);
  }

  // The ublk queues' rings (ublk/queue.h): made on the control thread, a
  // fixed file registered there, run on the queue's thread. A DEFER_TASKRUN
  // ring is single-issuer: made enabled, its issuer would be the creating
  // thread and the loop's io_uring_enter would fail (EEXIST); run() enables it
  // instead. The read on the pipe completes while the loop waits: with
  // DEFER_TASKRUN that completion is task work only a GETEVENTS enter runs.
  TEST_CASE("every RingMode: fixed file before run(), run() on another thread, waits woken") {
    for (Reactor::RingMode want :
         {Reactor::RingMode::kPlain, Reactor::RingMode::kCoop, Reactor::RingMode::kDefer}) {
      CAPTURE(RingModeName(want));
      auto r = Reactor::Create("t", 16, want);
      REQUIRE(r.ok());
      Reactor& reactor = *r.value();
      // This machine's kernel (6.18) has every flag; an old one gets a weaker mode.
      CHECK(std::string(RingModeName(reactor.mode())) == RingModeName(want));
      int p[2];
      REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
      REQUIRE(io_uring_register_files(reactor.ring(), &p[0], 1) == 0);
      struct ReadOp final : Reactor::Op {
        Reactor* reactor = nullptr;
        char buf[8] = {};
        std::promise<int> res;
        bool on_loop = false;
        void complete(int n, uint32_t) override {
          on_loop = reactor->in_loop_thread();
          res.set_value(n);
        }
      } op;
      op.reactor = &reactor;
      std::promise<void> armed;
      reactor.post([&] {  // posted before run(): runs on the loop thread
        io_uring_sqe* sqe = reactor.sqe(&op);
        io_uring_prep_read(sqe, 0, op.buf, sizeof(op.buf), 0);
        sqe->flags |= IOSQE_FIXED_FILE;
        armed.set_value();
      });
      std::thread loop([&] { reactor.run(); });
      REQUIRE(armed.get_future().wait_for(kTimeout) == std::future_status::ready);
      std::this_thread::sleep_for(20ms);  // the loop is asleep in io_uring_enter
      REQUIRE(::write(p[1], "ring", 4) == 4);
      auto f = op.res.get_future();
      REQUIRE(f.wait_for(kTimeout) == std::future_status::ready);
      CHECK(f.get() == 4);
      CHECK(op.on_loop);
      CHECK(std::string(op.buf, 4) == "ring");
      // post() still wakes the loop after the ring was enabled.
      std::promise<void> again;
      reactor.post([&] { again.set_value(); });
      CHECK(again.get_future().wait_for(kTimeout) == std::future_status::ready);
      reactor.stop();
      loop.join();
      ::close(p[0]);
      ::close(p[1]);
    }
  }

  TEST_CASE("ReactorPool: threads, round-robin next(), stop_and_join") {
    auto p = ReactorPool::Create(2, 32);
    REQUIRE(p.ok());
    ReactorPool& pool = *p.value();
    REQUIRE(pool.size() == 2);
    Reactor* a = &pool.next();
    Reactor* b = &pool.next();
    Reactor* c = &pool.next();
    CHECK(a != b);
    CHECK(a == c);
    std::promise<std::thread::id> ta, tb;
    pool.at(0).post([&] { ta.set_value(std::this_thread::get_id()); });
    pool.at(1).post([&] { tb.set_value(std::this_thread::get_id()); });
    auto fa = ta.get_future(), fb = tb.get_future();
    REQUIRE(fa.wait_for(kTimeout) == std::future_status::ready);
    REQUIRE(fb.wait_for(kTimeout) == std::future_status::ready);
    auto ida = fa.get(), idb = fb.get();
    CHECK(ida != idb);
    CHECK(ida != std::this_thread::get_id());
    pool.stop_and_join();
    pool.stop_and_join();  // idempotent; the destructor calls it again

    auto p0 = ReactorPool::Create(0, 8);  // 0 = one per CPU
    REQUIRE(p0.ok());
    CHECK(p0.value()->size() >= 1);
  }
}

// ---------------------------------------------------------------- FileDisk

TEST_SUITE("file_disk") {
  TEST_CASE("Open: name, size, caps; a missing file is an error") {
    TempFile f(8 * kMiB);
    auto disk = open_disk(f);
    CHECK(disk->name() == "d0");
    CHECK(disk->path() == f.path());
    CHECK(disk->size() == 8 * kMiB);
    CHECK_FALSE(disk->is_block_device());
    CHECK_FALSE(disk->direct());
    DeviceCaps caps = disk->caps();
    CHECK_FALSE(caps.read_only);
    CHECK(caps.can_flush);
    CHECK(caps.min_block >= 1);

    FileDiskOptions o;
    o.name = "missing";
    o.path = f.path() + ".does-not-exist";
    auto r = FileDisk::Open(o);
    CHECK_FALSE(r.ok());
  }

  TEST_CASE("write, read back, flush, FUA (buffered)") {
    TempFile f(8 * kMiB);
    auto disk = open_disk(f);
    LoopThread loop;
    const size_t len = 64 * 1024;
    auto w = aligned_buf(len), r = aligned_buf(len);
    fill_pattern(w.get(), len, 1);
    CHECK(run_io(loop, *disk, IoKind::kWrite, 128 * 1024, len, w.get()) == 0);
    CHECK(run_io(loop, *disk, IoKind::kRead, 128 * 1024, len, r.get()) == 0);
    CHECK(std::memcmp(w.get(), r.get(), len) == 0);
    CHECK(run_io(loop, *disk, IoKind::kFlush, 0, 0) == 0);
    auto on_disk = f.pread(128 * 1024, len);
    CHECK(std::memcmp(on_disk.data(), w.get(), len) == 0);

    fill_pattern(w.get(), len, 2);
    CHECK(run_io(loop, *disk, IoKind::kWrite, 0, len, w.get(), kIoFua) == 0);
    on_disk = f.pread(0, len);
    CHECK(std::memcmp(on_disk.data(), w.get(), len) == 0);
    CHECK(disk->sync().ok());

    // Data written behind the engine's back is what it reads (no stale cache).
    std::vector<char> outside(4096, 'x');
    f.pwrite(7 * kMiB, outside.data(), outside.size());
    CHECK(run_io(loop, *disk, IoKind::kRead, 7 * kMiB, 4096, r.get()) == 0);
    CHECK(std::memcmp(r.get(), outside.data(), 4096) == 0);
  }

  TEST_CASE("direct=true: aligned and unaligned I/O both work and agree with the file") {
    TempFile f(8 * kMiB);
    auto disk = open_disk(f, /*direct=*/true);
    CHECK(disk->direct());
    LoopThread loop;
    auto w = aligned_buf(2 * kMiB), r = aligned_buf(2 * kMiB);

    SUBCASE("aligned") {
      fill_pattern(w.get(), kMiB, 3);
      CHECK(run_io(loop, *disk, IoKind::kWrite, kMiB, kMiB, w.get()) == 0);
      CHECK(run_io(loop, *disk, IoKind::kRead, kMiB, kMiB, r.get()) == 0);
      CHECK(std::memcmp(w.get(), r.get(), kMiB) == 0);
      auto on_disk = f.pread(kMiB, kMiB);
      CHECK(std::memcmp(on_disk.data(), w.get(), kMiB) == 0);
    }
    SUBCASE("unaligned offset, length and buffer") {
      // Whole-area background first, then a write that straddles sectors and pages.
      fill_pattern(w.get(), 3 * 4096, 4);
      CHECK(run_io(loop, *disk, IoKind::kWrite, 0, 3 * 4096, w.get()) == 0);
      char* ubuf = w.get() + 4096 * 3 + 3;  // deliberately misaligned memory
      const uint64_t uoff = 4096 + 513, ulen = 1000;
      fill_pattern(ubuf, ulen, 5);
      CHECK(run_io(loop, *disk, IoKind::kWrite, uoff, ulen, ubuf) == 0);

      std::vector<char> expect(3 * 4096);
      fill_pattern(expect.data(), expect.size(), 4);
      std::memcpy(expect.data() + uoff, ubuf, ulen);
      // Read the whole area aligned (the O_DIRECT path must see the buffered write) ...
      CHECK(run_io(loop, *disk, IoKind::kRead, 0, 3 * 4096, r.get()) == 0);
      CHECK(std::memcmp(r.get(), expect.data(), expect.size()) == 0);
      // ... and unaligned into misaligned memory.
      char* urd = r.get() + 5;
      CHECK(run_io(loop, *disk, IoKind::kRead, uoff - 7, ulen + 20, urd) == 0);
      CHECK(std::memcmp(urd, expect.data() + uoff - 7, ulen + 20) == 0);
      auto on_disk = f.pread(0, expect.size());
      CHECK(on_disk == expect);
    }
    SUBCASE("one byte at the last offset") {
      char c = 'Z', got = 0;
      CHECK(run_io(loop, *disk, IoKind::kWrite, 8 * kMiB - 1, 1, &c) == 0);
      CHECK(run_io(loop, *disk, IoKind::kRead, 8 * kMiB - 1, 1, &got) == 0);
      CHECK(got == 'Z');
    }
  }

  TEST_CASE("fixed buffers: the data moves from and into the registered pages, never memory") {
    // A request with fixed_buf (a ublk request's pages under zero copy) must
    // be served by READ_FIXED / WRITE_FIXED alone: not by pwrite on the
    // worker (buffered writes), not by a plain read/write through `buf`.
    // The pages registered here stay pinned by the ring after the test maps
    // fresh memory at the same address: a write that reads through the
    // mapping stores the new memory's bytes, a fixed one the pinned pages'.
    TempFile f(8 * kMiB);
    for (bool direct : {false, true}) {
      CAPTURE(direct);
      auto disk = open_disk(f, direct);
      CHECK(disk->caps().fixed_buffers);
      LoopThread loop;
      const size_t len = 256 * 1024;
      void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      REQUIRE(m != MAP_FAILED);
      char* a = static_cast<char*>(m);
      fill_pattern(a, len, 21);  // the pinned pages' bytes
      iovec iov{a, len};
      int rc = -1;
      loop.call([&] { rc = io_uring_register_buffers(loop.reactor().ring(), &iov, 1); });
      REQUIRE(rc == 0);
      // New memory at the same address; the ring keeps the old pages.
      REQUIRE(::mmap(a, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                     0) == a);
      std::memset(a, 'Q', len);
      std::vector<char> pinned(len);
      fill_pattern(pinned.data(), len, 21);
      // Aligned (O_DIRECT when direct), and unaligned (the buffered descriptor).
      for (auto [off, n, at] : {std::tuple<uint64_t, uint64_t, size_t>{kMiB, 128 * 1024, 0},
                                {2 * kMiB + 513, 10000, 4096 + 7}}) {
        CAPTURE(off);
        TestIo w(IoKind::kWrite, off, n, a + at);
        w.fixed_buf = 0;
        submit(loop, *disk, w);
        REQUIRE(w.wait() == 0);
        auto on_disk = f.pread(off, n);
        CHECK(std::memcmp(on_disk.data(), pinned.data() + at, n) == 0);
        // A read into the pinned pages leaves the mapping's memory alone.
        std::vector<char> rr(n, 'R');
        f.pwrite(off, rr.data(), n);
        TestIo r(IoKind::kRead, off, n, a + at);
        r.fixed_buf = 0;
        submit(loop, *disk, r);
        REQUIRE(r.wait() == 0);
        CHECK(std::all_of(a, a + len, [](char c) { return c == 'Q'; }));
        // And the pinned pages got it: write them back out elsewhere.
        TestIo w2(IoKind::kWrite, 6 * kMiB, n, a + at);
        w2.fixed_buf = 0;
        submit(loop, *disk, w2);
        REQUIRE(w2.wait() == 0);
        auto back = f.pread(6 * kMiB, n);
        CHECK(std::all_of(back.begin(), back.end(), [](char c) { return c == 'R'; }));
        std::memset(pinned.data() + at, 'R', n);  // what the pinned pages hold now
      }
      loop.call([&] { io_uring_unregister_buffers(loop.reactor().ring()); });
      ::munmap(a, len);
    }
  }

  TEST_CASE("many requests in flight at once all complete once, with their own data") {
    TempFile f(8 * kMiB);
    for (bool direct : {false, true}) {
      CAPTURE(direct);
      auto disk = open_disk(f, direct);
      LoopThread loop(32);  // fewer SQEs than requests
      constexpr int kN = 96;
      auto bufs = aligned_buf(kN * 4096);
      std::vector<std::unique_ptr<TestIo>> ios;
      for (int i = 0; i < kN; ++i) {
        fill_pattern(bufs.get() + i * 4096, 4096, 100 + i);
        // Spread over the disk, in a scrambled order.
        uint64_t off = static_cast<uint64_t>((i * 37) % kN) * 4096 * 8;
        ios.push_back(std::make_unique<TestIo>(IoKind::kWrite, off, 4096, bufs.get() + i * 4096));
        ios.back()->reactor = &loop.reactor();
      }
      loop.call([&] {
        t_in_submit = true;
        for (auto& io : ios) disk->submit(loop.reactor(), *io);
        t_in_submit = false;
      });
      for (auto& io : ios) {
        CHECK(io->wait() == 0);
        CHECK_FALSE(io->inside_submit);
        CHECK(io->calls.load() == 1);
      }
      CHECK(run_io(loop, *disk, IoKind::kFlush, 0, 0) == 0);
      for (int i = 0; i < kN; ++i) {
        auto on_disk = f.pread(ios[i]->offset, 4096);
        CHECK(std::memcmp(on_disk.data(), bufs.get() + i * 4096, 4096) == 0);
      }
    }
  }

  TEST_CASE("write_zeroes zeroes exactly its range (aligned and not)") {
    TempFile f(8 * kMiB);
    auto disk = open_disk(f);
    LoopThread loop;
    if (!disk->caps().can_zero) {
      MESSAGE("device does not advertise write_zeroes; skipped");
      return;
    }
    const size_t len = 2 * kMiB;
    auto w = aligned_buf(len), r = aligned_buf(len);
    fill_pattern(w.get(), len, 6);
    REQUIRE(run_io(loop, *disk, IoKind::kWrite, 0, len, w.get()) == 0);

    struct Z {
      uint64_t off, len;
      uint32_t flags;
    };
    for (Z z : {Z{1000, 5000, 0}, Z{kMiB, 256 * 1024, 0}, Z{300 * 1024, 64 * 1024, kIoNoHole},
                Z{600 * 1024 + 1, 4095, kIoFua}}) {
      CAPTURE(z.off);
      CAPTURE(z.flags);
      CHECK(run_io(loop, *disk, IoKind::kWriteZeroes, z.off, z.len, nullptr, z.flags) == 0);
      std::memset(w.get() + z.off, 0, z.len);
    }
    CHECK(run_io(loop, *disk, IoKind::kRead, 0, len, r.get()) == 0);
    CHECK(std::memcmp(r.get(), w.get(), len) == 0);
    auto on_disk = f.pread(0, len);
    CHECK(std::memcmp(on_disk.data(), w.get(), len) == 0);

    // FAST_ZERO: either cheap zeroing (then zeroes) or -ENOTSUP (then untouched).
    fill_pattern(w.get(), 64 * 1024, 7);
    REQUIRE(run_io(loop, *disk, IoKind::kWrite, 4 * kMiB, 64 * 1024, w.get()) == 0);
    int rc = run_io(loop, *disk, IoKind::kWriteZeroes, 4 * kMiB, 64 * 1024, nullptr, kIoFastZero);
    CHECK((rc == 0 || rc == -ENOTSUP));
    if (disk->caps().can_fast_zero) CHECK(rc == 0);
    CHECK(run_io(loop, *disk, IoKind::kRead, 4 * kMiB, 64 * 1024, r.get()) == 0);
    if (rc == 0) {
      CHECK(all_zero(r.get(), 64 * 1024));
    } else {
      CHECK(std::memcmp(r.get(), w.get(), 64 * 1024) == 0);
    }
  }

  TEST_CASE("trim leaves a hole that block_status reports and that reads as zeroes") {
    TempFile f(8 * kMiB);
    auto disk = open_disk(f);
    LoopThread loop;
    if (!disk->caps().can_trim) {
      MESSAGE("device does not advertise trim; skipped");
      return;
    }
    const size_t len = 4 * kMiB;
    auto w = aligned_buf(len), r = aligned_buf(len);
    fill_pattern(w.get(), len, 8);
    REQUIRE(run_io(loop, *disk, IoKind::kWrite, 0, len, w.get()) == 0);
    REQUIRE(run_io(loop, *disk, IoKind::kFlush, 0, 0) == 0);
    CHECK(run_io(loop, *disk, IoKind::kTrim, kMiB, kMiB) == 0);
    CHECK(run_io(loop, *disk, IoKind::kRead, 0, len, r.get()) == 0);
    // Trimmed contents are unspecified by NBD, but a punched hole in a file reads as zeroes.
    CHECK(all_zero(r.get() + kMiB, kMiB));
    CHECK(std::memcmp(r.get(), w.get(), kMiB) == 0);
    CHECK(std::memcmp(r.get() + 2 * kMiB, w.get() + 2 * kMiB, 2 * kMiB) == 0);

    auto ext = disk->block_status(kMiB, kMiB, 16);
    REQUIRE(ext.ok());
    REQUIRE_FALSE(ext->empty());
    CHECK((ext->front().flags & Extent::kHole) != 0);
    CHECK((ext->front().flags & Extent::kZero) != 0);
    auto data = disk->block_status(0, 4096, 16);
    REQUIRE(data.ok());
    REQUIRE_FALSE(data->empty());
    CHECK(data->front().flags == 0);
  }

  TEST_CASE("block_status maps holes and data, covers at least one byte, honours max_extents") {
    const uint64_t size = 8 * kMiB;
    TempFile f(size);  // sparse
    std::vector<char> data(256 * 1024, 'd');
    f.pwrite(2 * kMiB, data.data(), data.size());
    auto disk = open_disk(f);

    auto all = disk->block_status(0, size, 64);
    REQUIRE(all.ok());
    REQUIRE_FALSE(all->empty());
    CHECK(all->size() <= 64);
    uint64_t pos = 0;
    bool saw_data = false, saw_hole = false;
    for (const Extent& e : *all) {
      CHECK(e.length > 0);
      if (pos <= 2 * kMiB && pos + e.length > 2 * kMiB) {
        CHECK(e.flags == 0);  // the written range is data
      }
      if (pos + e.length <= 2 * kMiB) {
        CHECK((e.flags & Extent::kHole) != 0);  // untouched start of a sparse file
      }
      saw_data |= e.flags == 0;
      saw_hole |= (e.flags & Extent::kHole) != 0;
      pos += e.length;
    }
    CHECK(pos >= 1);
    CHECK(pos <= size);
    CHECK(saw_data);
    CHECK(saw_hole);

    auto one = disk->block_status(0, size, 1);
    REQUIRE(one.ok());
    CHECK(one->size() == 1);

    auto small = disk->block_status(2 * kMiB + 100, 10, 8);
    REQUIRE(small.ok());
    REQUIRE_FALSE(small->empty());
    uint64_t covered = 0;
    for (const Extent& e : *small) covered += e.length;
    CHECK(covered >= 1);
    CHECK(covered <= 10);
    CHECK(small->front().flags == 0);

    CHECK_FALSE(disk->block_status(size, 4096, 8).ok());
  }

  TEST_CASE("kBlockStatus requests answer like block_status(), through the ring") {
    const uint64_t size = 8 * kMiB;
    TempFile f(size);
    std::vector<char> data(256 * 1024, 'd');
    f.pwrite(2 * kMiB, data.data(), data.size());
    auto disk = open_disk(f);
    LoopThread loop;
    for (size_t max : {size_t(1), size_t(64)}) {
      TestIo io(IoKind::kBlockStatus, 0, size);
      io.max_extents = max;
      submit(loop, *disk, io);
      REQUIRE(io.wait() == 0);
      CHECK_FALSE(io.inside_submit);
      auto want = disk->block_status(0, size, max);
      REQUIRE(want.ok());
      REQUIRE(io.extents.size() == want->size());
      for (size_t i = 0; i < want->size(); ++i) {
        CHECK(io.extents[i].length == (*want)[i].length);
        CHECK(io.extents[i].flags == (*want)[i].flags);
      }
    }
    TestIo oor(IoKind::kBlockStatus, size, 4096);
    oor.max_extents = 8;
    submit(loop, *disk, oor);
    CHECK(oor.wait() == -EINVAL);
  }

  TEST_CASE("a buffered write stuck in the kernel does not stall the reactor") {
    // The write's source page is registered with userfaultfd and missing, so
    // the kernel's copy into the page cache sleeps in the fault until the test
    // supplies the page: a real pwrite that blocks, as dirty throttling would.
    // A read on the same reactor must complete meanwhile.
    TempFile f(4 * kMiB);
    auto disk = open_disk(f);  // buffered
    LoopThread loop;
    UniqueFd uffd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
    REQUIRE_MESSAGE(uffd.valid(), "userfaultfd: " << std::strerror(errno));
    uffdio_api api{};
    api.api = UFFD_API;
    REQUIRE(::ioctl(uffd.get(), UFFDIO_API, &api) == 0);
    const size_t page = 4096;
    void* mem = ::mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(mem != MAP_FAILED);
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<uintptr_t>(mem);
    reg.range.len = page;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    REQUIRE(::ioctl(uffd.get(), UFFDIO_REGISTER, &reg) == 0);

    TestIo write(IoKind::kWrite, 0, page, static_cast<char*>(mem));
    write.reactor = &loop.reactor();
    auto rbuf = aligned_buf(page);
    TestIo read(IoKind::kRead, kMiB, page, rbuf.get());
    read.reactor = &loop.reactor();
    // Posted without waiting: on a reactor that blocks, post() would not return.
    loop.reactor().post([&] { disk->submit(loop.reactor(), write); });
    loop.reactor().post([&] { disk->submit(loop.reactor(), read); });
    auto read_done = std::async(std::launch::async, [&] { return read.wait(); });
    bool served = read_done.wait_for(5s) == std::future_status::ready;
    CHECK_MESSAGE(served, "a read waited behind a blocked buffered write on the reactor");

    // Supply the page: the write completes with its data.
    alignas(4096) static char src[4096];
    std::memset(src, 'W', sizeof src);
    uffdio_copy copy{};
    copy.dst = reinterpret_cast<uintptr_t>(mem);
    copy.src = reinterpret_cast<uintptr_t>(src);
    copy.len = page;
    REQUIRE(::ioctl(uffd.get(), UFFDIO_COPY, &copy) == 0);
    CHECK(write.wait() == 0);
    CHECK(read_done.get() == 0);
    CHECK(write.on_loop_thread);
    CHECK_FALSE(write.inside_submit);
    auto got = f.pread(0, page);
    CHECK(std::all_of(got.begin(), got.end(), [](char c) { return c == 'W'; }));
    ::munmap(mem, page);
  }

  TEST_CASE("reactor threads are marked; other threads are not") {
    CHECK_FALSE(OnReactorThread());
    LoopThread loop;
    bool marked = false;
    loop.call([&] { marked = OnReactorThread(); });
    CHECK(marked);
    CHECK_FALSE(OnReactorThread());
  }

  TEST_CASE("out-of-range requests fail with -EINVAL and touch nothing") {
    const uint64_t size = 4 * kMiB;
    TempFile f(size);
    auto disk = open_disk(f);
    LoopThread loop;

    CHECK(disk->check_range(0, size).ok());
    CHECK(disk->check_range(size - 1, 1).ok());
    CHECK(disk->check_range(size - 4096, 4096).ok());
    CHECK(disk->check_range(size, 1).code() == Code::kOutOfRange);
    CHECK(disk->check_range(size - 1, 2).code() == Code::kOutOfRange);
    CHECK(disk->check_range(UINT64_MAX, 2).code() == Code::kOutOfRange);  // wraps
    CHECK(disk->check_range(2, UINT64_MAX).code() == Code::kOutOfRange);

    auto b = aligned_buf(8192);
    std::memset(b.get(), 'q', 8192);
    CHECK(run_io(loop, *disk, IoKind::kRead, size, 4096, b.get()) == -EINVAL);
    CHECK(run_io(loop, *disk, IoKind::kRead, size - 4096, 8192, b.get()) == -EINVAL);
    CHECK(run_io(loop, *disk, IoKind::kWrite, size - 4096, 8192, b.get()) == -EINVAL);
    CHECK(run_io(loop, *disk, IoKind::kWrite, UINT64_MAX - 10, 4096, b.get()) == -EINVAL);
    if (disk->caps().can_zero) {
      CHECK(run_io(loop, *disk, IoKind::kWriteZeroes, size - 1, 2) == -EINVAL);
    }
    if (disk->caps().can_trim) {
      CHECK(run_io(loop, *disk, IoKind::kTrim, size, 4096) == -EINVAL);
    }
    CHECK(f.file_size() == size);  // a failed write must not extend the file
    auto tail = f.pread(size - 4096, 4096);
    CHECK(all_zero(tail.data(), tail.size()));
  }

  TEST_CASE("read-only: reads work, every mutation fails with -EPERM") {
    TempFile f(4 * kMiB);
    std::vector<char> orig(8192);
    fill_pattern(orig.data(), orig.size(), 9);
    f.pwrite(0, orig.data(), orig.size());
    auto disk = open_disk(f, /*direct=*/false, /*read_only=*/true);
    CHECK(disk->caps().read_only);
    LoopThread loop;
    auto b = aligned_buf(8192);
    CHECK(run_io(loop, *disk, IoKind::kRead, 0, 8192, b.get()) == 0);
    CHECK(std::memcmp(b.get(), orig.data(), 8192) == 0);
    std::memset(b.get(), 'w', 8192);
    CHECK(run_io(loop, *disk, IoKind::kWrite, 0, 4096, b.get()) == -EPERM);
    CHECK(run_io(loop, *disk, IoKind::kWrite, 0, 4096, b.get(), kIoFua) == -EPERM);
    CHECK(run_io(loop, *disk, IoKind::kWriteZeroes, 0, 4096) == -EPERM);
    CHECK(run_io(loop, *disk, IoKind::kTrim, 0, 4096) == -EPERM);
    auto now = f.pread(0, 8192);
    CHECK(now == orig);
  }

  TEST_CASE("grow() extends the disk (zero-filled) and never shrinks it") {
    TempFile f(4 * kMiB);
    auto disk = open_disk(f);
    LoopThread loop;
    REQUIRE(disk->grow(6 * kMiB).ok());
    CHECK(disk->size() == 6 * kMiB);
    CHECK(f.file_size() == 6 * kMiB);
    auto b = aligned_buf(4096);
    std::memset(b.get(), 1, 4096);
    CHECK(run_io(loop, *disk, IoKind::kRead, 5 * kMiB, 4096, b.get()) == 0);
    CHECK(all_zero(b.get(), 4096));
    CHECK(run_io(loop, *disk, IoKind::kWrite, 6 * kMiB - 4096, 4096, b.get()) == 0);
    (void)disk->grow(2 * kMiB);  // may succeed as a no-op or fail; never shrinks
    CHECK(disk->size() == 6 * kMiB);
    CHECK(f.file_size() == 6 * kMiB);
  }

  TEST_CASE("Use counts users; retire() is sticky") {
    TempFile f(kMiB);
    auto disk = open_disk(f);
    CHECK(disk->users() == 0);
    {
      BlockDevice::Use u1(disk);
      CHECK(disk->users() == 1);
      BlockDevice::Use u2(disk);
      CHECK(disk->users() == 2);
      BlockDevice::Use moved(std::move(u2));
      CHECK(disk->users() == 2);
      CHECK(moved->name() == "d0");
    }
    CHECK(disk->users() == 0);
    CHECK_FALSE(disk->retired());
    disk->retire();
    CHECK(disk->retired());
  }
}

}  // namespace rpoint
