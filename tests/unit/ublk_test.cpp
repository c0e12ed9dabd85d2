// ublk/: what can be checked without the kernel driver (this host has none;
// the data path runs in the VM lane, tests/vm/test_ublk.py): the descriptor
// mapping offsets, the params the driver would validate, the clear refusal
// where /dev/ublk-control is missing, and the read-only view NBD clients of a
// ublk disk get (engine/read_only_device.h) on a real reactor and file.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <string>
#include <thread>

#include "engine/file_disk.h"
#include "engine/read_only_device.h"
#include "engine/reactor.h"
#include "ublk/control.h"
#include "ublk/device.h"
#include "ublk/queue.h"

namespace rpoint {
namespace {

using namespace std::chrono_literals;

struct TempDisk {
  TempDisk() {
    char tmpl[] = "/tmp/ublk_test.XXXXXX";
    dir = ::mkdtemp(tmpl);
    path = dir + "/d.raw";
    int fd = ::open(path.c_str(), O_CREAT | O_RDWR, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, 8 << 20) == 0);
    ::close(fd);
    FileDiskOptions o;
    o.name = "d";
    o.path = path;
    auto r = FileDisk::Open(o);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    disk = std::move(r).value();
  }
  ~TempDisk() {
    disk.reset();
    std::string cmd = "rm -rf '" + dir + "'";
    (void)std::system(cmd.c_str());
  }
  std::string dir, path;
  std::shared_ptr<FileDisk> disk;
};

class WaitIo final : public IoRequest {
 public:
  void on_done(int result) override { done.set_value(result); }
  std::promise<int> done;
};

int Run(Reactor& r, BlockDevice& dev, WaitIo& io) {
  r.post([&] { dev.submit(r, io); });
  auto f = io.done.get_future();
  REQUIRE(f.wait_for(20s) == std::future_status::ready);
  return f.get();
}

TEST_CASE("ublk: queue q's descriptors are spaced by the largest depth, not by the queue's") {
  long page = ::sysconf(_SC_PAGESIZE);
  // 4096 descriptors of 24 bytes: 24 pages apart, whatever the depth (the
  // driver's ublk_ch_mmap divides the offset by that to find the queue).
  CHECK(UblkDescOffset(0) == 0);
  CHECK(UblkDescOffset(1) == uint64_t(UBLK_MAX_QUEUE_DEPTH) * sizeof(ublksrv_io_desc));
  CHECK(UblkDescOffset(3) == 3u * 98304u);
  CHECK(UblkDescOffset(1) % page == 0);
  // The mapping itself is the queue's depth, rounded up to pages.
  CHECK(UblkDescBytes(128) == size_t(page));
  CHECK(UblkDescBytes(4096) == 98304);
}

TEST_CASE("ublk: user copy positions are the driver's (q_id << 41) + (tag << 25) above 2 GiB") {
  // ublk_pos_to_hwq / ublk_pos_to_tag in the 6.5+ driver decode these.
  CHECK(UblkUserCopyPos(0, 0) == 0x80000000ull);
  CHECK(UblkUserCopyPos(0, 1) == 0x80000000ull + (1ull << 25));
  CHECK(UblkUserCopyPos(1, 0) == 0x80000000ull + (1ull << 41));
  CHECK(UblkUserCopyPos(3, 4095) == 0x80000000ull + (3ull << 41) + (4095ull << 25));
  // A tag's window (32 MiB) holds the largest request.
  CHECK((UblkUserCopyPos(0, 1) - UblkUserCopyPos(0, 0)) >= 512u * 1024);
  CHECK(kUblkCmdGetFeatures == 0x80207513u);  // _IOR('u', 0x13, struct ublksrv_ctrl_cmd)
}

TEST_CASE("ublk: params pass the driver's checks and describe the disk") {
  TempDisk t;
  ublk_params p = UblkParamsFor(*t.disk, 512 * 1024);
  CHECK((p.types & UBLK_PARAM_TYPE_BASIC) != 0);
  CHECK(p.len == sizeof(p));
  CHECK(p.basic.dev_sectors == (8u << 20) / 512);
  // ublk_validate_params: 9 <= logical <= page shift, logical <= physical,
  // max_sectors within max_io_buf_bytes.
  CHECK(p.basic.logical_bs_shift == 9);
  CHECK(p.basic.physical_bs_shift >= p.basic.logical_bs_shift);
  CHECK(p.basic.max_sectors == 1024);
  CHECK((p.basic.attrs & UBLK_ATTR_VOLATILE_CACHE) != 0);
  CHECK((p.basic.attrs & UBLK_ATTR_FUA) != 0);
  CHECK((p.basic.attrs & UBLK_ATTR_READ_ONLY) == 0);
  DeviceCaps caps = t.disk->caps();
  if (caps.can_trim || caps.can_zero) {
    CHECK((p.types & UBLK_PARAM_TYPE_DISCARD) != 0);
    CHECK(p.discard.discard_granularity != 0);  // the driver refuses 0
    CHECK(p.discard.max_discard_segments == 1);  // and any other count
  }
  CHECK((p.discard.max_discard_sectors != 0) == caps.can_trim);
  CHECK((p.discard.max_write_zeroes_sectors != 0) == caps.can_zero);
  // A read-only device says so.
  ReadOnlyDevice ro(t.disk);
  CHECK((UblkParamsFor(ro, 512 * 1024).basic.attrs & UBLK_ATTR_READ_ONLY) != 0);
  // max_sectors follows the device's largest request: a 1 MiB request whole.
  CHECK(UblkParamsFor(*t.disk, 1024 * 1024).basic.max_sectors == 2048);
  CHECK(UblkParamsFor(*t.disk, kUblkMaxIoBytes).basic.max_sectors == 65536);
}

TEST_CASE("ublk: max_io_bytes is a power of two from a page to a tag's user-copy window") {
  CHECK(CheckUblkMaxIoBytes(4096).ok());
  CHECK(CheckUblkMaxIoBytes(1024 * 1024).ok());
  CHECK(CheckUblkMaxIoBytes(kUblkMaxIoBytes).ok());
  // The window is exactly the distance between two tags' copy positions.
  CHECK(kUblkMaxIoBytes == UblkUserCopyPos(0, 1) - UblkUserCopyPos(0, 0));
  for (uint32_t bad : {0u, 512u, 2048u, 4095u, 4097u, 3u << 20, 2u * kUblkMaxIoBytes}) {
    Status s = CheckUblkMaxIoBytes(bad);
    CHECK_FALSE(s.ok());
    CHECK(s.code() == Code::kInvalidArgument);
    CHECK(s.message().find("ublk.max_io_bytes") != std::string::npos);
    CHECK(s.message().find(std::to_string(bad)) != std::string::npos);
  }
}

TEST_CASE("ublk: no /dev/ublk-control gives the module's name and how to load it") {
  auto c = UblkControl::Open("/nonexistent/ublk-control");
  REQUIRE_FALSE(c.ok());
  const std::string& m = c.status().message();
  CHECK(m.find("ublk_drv") != std::string::npos);
  CHECK(m.find("modprobe ublk_drv") != std::string::npos);
  CHECK(m.find("/nonexistent/ublk-control") != std::string::npos);
  CHECK(UblkControl::UnavailableReason("/dev/null").empty());
}

TEST_CASE("ReadOnlyDevice: reads pass through, writes, trims and zeroes get EPERM") {
  TempDisk t;
  auto r = Reactor::Create("t", 64);
  REQUIRE(r.ok());
  std::unique_ptr<Reactor> reactor = std::move(r).value();
  std::thread loop([&] { reactor->run(); });
  ReadOnlyDevice ro(t.disk);
  CHECK(ro.caps().read_only);
  CHECK_FALSE(ro.caps().can_trim);
  alignas(4096) static char buf[4096];
  std::memset(buf, 'x', sizeof(buf));
  {
    WaitIo w;  // through the disk itself: it is writable
    w.kind = IoKind::kWrite;
    w.length = 4096;
    w.buf = buf;
    CHECK(Run(*reactor, *t.disk, w) == 0);
  }
  for (IoKind k : {IoKind::kWrite, IoKind::kTrim, IoKind::kWriteZeroes}) {
    WaitIo w;
    w.kind = k;
    w.length = 4096;
    w.buf = buf;
    CHECK(Run(*reactor, ro, w) == -EPERM);
  }
  {
    std::memset(buf, 0, sizeof(buf));
    WaitIo rd;
    rd.kind = IoKind::kRead;
    rd.length = 4096;
    rd.buf = buf;
    CHECK(Run(*reactor, ro, rd) == 0);
    CHECK(buf[0] == 'x');
    CHECK(buf[4095] == 'x');
  }
  ro.retire();
  {
    WaitIo rd;
    rd.kind = IoKind::kRead;
    rd.length = 4096;
    rd.buf = buf;
    CHECK(Run(*reactor, ro, rd) == -ESHUTDOWN);
  }
  reactor->stop();
  loop.join();
}

}  // namespace
}  // namespace rpoint
