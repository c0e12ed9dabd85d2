#include "ublk/queue.h"

#include <pthread.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

#include "ublk/control.h"

namespace rpoint {

namespace {

constexpr uint32_t kSectorShift = 9;

size_t PageRound(size_t n) {
  size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return (n + page - 1) / page * page;
}

}  // namespace

uint64_t UblkDescOffset(uint16_t q_id) {
  return UBLKSRV_CMD_BUF_OFFSET +
         uint64_t{q_id} * PageRound(UBLK_MAX_QUEUE_DEPTH * sizeof(ublksrv_io_desc));
}

size_t UblkDescBytes(uint16_t depth) {
  return PageRound(depth * sizeof(ublksrv_io_desc));
}

// One tag: the request slot the engine sees (IoRequest), and the ring
// operation of the tag's FETCH / COMMIT_AND_FETCH command.
struct UblkQueue::Tag final : public IoRequest {
  struct CmdOp final : public Reactor::Op {
    Tag* t = nullptr;
    void complete(int res, uint32_t) override { t->q->on_cmd(*t, res); }
  };
  struct CopyOp final : public Reactor::Op {
    Tag* t = nullptr;
    void complete(int res, uint32_t) override { t->q->on_copy(*t, res); }
  };
  UblkQueue* q = nullptr;
  uint16_t tag = 0;
  uint8_t op = 0;
  CmdOp cmd;
  CopyOp copy;
  void on_done(int result) override { q->on_io_done(*this, result); }
};

UblkQueue::UblkQueue(const UblkQueueOptions& opts, std::shared_ptr<BlockDevice> dev)
    : opts_(opts), dev_(std::move(dev)) {}

Result<std::unique_ptr<UblkQueue>> UblkQueue::Create(const UblkQueueOptions& opts,
                                                     std::shared_ptr<BlockDevice> dev) {
  std::unique_ptr<UblkQueue> q(new UblkQueue(opts, std::move(dev)));
  std::string what = "ublk " + std::to_string(opts.dev_id) + " queue " + std::to_string(opts.q_id);
  q->descs_len_ = UblkDescBytes(opts.depth);
  void* m = ::mmap(nullptr, q->descs_len_, PROT_READ, MAP_SHARED | MAP_POPULATE, opts.char_fd,
                   static_cast<off_t>(UblkDescOffset(opts.q_id)));
  if (m == MAP_FAILED) return Status::FromErrno(errno, what + ": mmap of the I/O descriptors");
  q->descs_ = static_cast<const ublksrv_io_desc*>(m);
  size_t buf_bytes = size_t{opts.depth} * opts.max_io_bytes;
  // Anonymous memory: page aligned (O_DIRECT-capable), touched only when used:
  // a tag's buffer costs what its largest request wrote into it. NORESERVE:
  // the reservation (depth * max_io_bytes, up to 32 GiB at depth 1024 and
  // 32 MiB) is address space, not a commitment the overcommit check refuses.
  void* b = ::mmap(nullptr, buf_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (b == MAP_FAILED) return Status::FromErrno(errno, what + ": buffers");
  q->bufs_ = static_cast<char*>(b);
  // Every tag has one command in flight, each request one or two engine
  // operations: the ring holds them all, the CQ four times that.
  auto r = Reactor::Create("ublk" + std::to_string(opts.dev_id) + "q" + std::to_string(opts.q_id),
                           2u * opts.depth + 16, opts.ring_mode);
  if (!r.ok()) return r.status();
  q->reactor_ = std::move(r).value();
  // Before run(): a kDefer ring is still disabled, which registration allows
  // from this (not yet the issuer) thread.
  int fd = opts.char_fd;
  int rc = io_uring_register_files(q->reactor_->ring(), &fd, 1);
  if (rc < 0) return Status::FromErrno(-rc, what + ": registering /dev/ublkc as a fixed file");
  if (opts.auto_buf_reg) {
    // One empty slot per tag: the driver fills tag t's at index t.
    rc = io_uring_register_buffers_sparse(q->reactor_->ring(), opts.depth);
    if (rc < 0) return Status::FromErrno(-rc, what + ": a sparse fixed-buffer table (zero copy)");
  }
  for (uint16_t i = 0; i < opts.depth; ++i) {
    auto t = std::make_unique<Tag>();
    t->q = q.get();
    t->tag = i;
    t->cmd.t = t.get();
    t->copy.t = t.get();
    t->buf = q->bufs_ + size_t{i} * opts.max_io_bytes;
    q->tags_.push_back(std::move(t));
  }
  return q;
}

UblkQueue::~UblkQueue() {
  drain_and_stop();
  reactor_.reset();  // the ring's teardown cancels the commands the kernel holds
  if (descs_) ::munmap(const_cast<ublksrv_io_desc*>(descs_), descs_len_);
  if (bufs_) ::munmap(bufs_, size_t{opts_.depth} * opts_.max_io_bytes);
}

void UblkQueue::start() {
  started_ = true;
  reactor_->post([this] {
    for (auto& t : tags_) issue_cmd(*t, UBLK_IO_FETCH_REQ, 0);
  });
  thread_ = std::thread([this] {
    std::string n = reactor_->name().substr(0, 15);
    pthread_setname_np(pthread_self(), n.c_str());
    if (opts_.pin) {
      int rc = pthread_setaffinity_np(pthread_self(), sizeof(opts_.cpus), &opts_.cpus);
      if (rc != 0) {
        spdlog::warn("ublk {} queue {}: pinning to its CPUs: {}", opts_.dev_id, opts_.q_id,
                     std::strerror(rc));
      }
    }
    reactor_->run();
  });
}

void UblkQueue::drain_and_stop(int timeout_ms) {
  if (!thread_.joinable()) return;
  reactor_->post([this] { draining_ = true; });
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (in_engine_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (in_engine_.load() > 0) {
    spdlog::error("ublk {} queue {}: {} request(s) still in the engine after {} ms", opts_.dev_id,
                  opts_.q_id, in_engine_.load(), timeout_ms);
  }
  // The last commits are still SQEs: submit them before the loop ends.
  std::atomic<bool> flushed{false};
  reactor_->post([this, &flushed] {
    io_uring_submit(reactor_->ring());
    flushed.store(true);
  });
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!flushed.load() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  reactor_->stop();
  thread_.join();
}

void UblkQueue::issue_cmd(Tag& t, uint32_t op, int result) {
  io_uring_sqe* sqe = reactor_->sqe(&t.cmd);
  // io_uring_get_sqe does not clear; liburing 2.3 has no uring_cmd helper.
  std::memset(sqe, 0, sizeof(*sqe));
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = 0;  // index of /dev/ublkcN among the fixed files
  sqe->flags = IOSQE_FIXED_FILE;
  sqe->cmd_op = op;
  io_uring_sqe_set_data(sqe, &t.cmd);
  ublksrv_io_cmd cmd{};
  cmd.q_id = opts_.q_id;
  cmd.tag = t.tag;
  cmd.result = result;
  // User copy: the driver refuses a buffer address (the data moves by
  // issue_copy instead). Zero copy: no buffer either; the SQE's own addr
  // (not the command's) names the fixed-buffer slot for the next request,
  // flags 0 (no fallback: a registration that fails fails the request).
  cmd.addr = opts_.user_copy || opts_.auto_buf_reg ? 0 : reinterpret_cast<uint64_t>(t.buf);
  if (opts_.auto_buf_reg) sqe->addr = t.tag;
  static_assert(sizeof(cmd) == 16, "fits the cmd area of a 64-byte SQE");
  std::memcpy(sqe->cmd, &cmd, sizeof(cmd));
}

void UblkQueue::on_cmd(Tag& t, int res) {
  if (res == UBLK_IO_RES_ABORT) return;  // the device is going away: no refetch
  if (res != UBLK_IO_RES_OK) {
    if (!failed_.exchange(true)) {
      spdlog::error("ublk {} queue {} tag {}: command failed: {}", opts_.dev_id, opts_.q_id, t.tag,
                    std::strerror(-res));
    }
    return;
  }
  // The descriptor is the kernel's; read it once.
  ublksrv_io_desc d;
  std::memcpy(&d, &descs_[t.tag], sizeof(d));
  if (draining_) return;  // left with the kernel: requeued for the next server
  t.op = static_cast<uint8_t>(ublksrv_get_op(&d));
  uint32_t flags = ublksrv_get_flags(&d);
  t.offset = d.start_sector << kSectorShift;
  t.length = uint64_t{d.nr_sectors} << kSectorShift;
  t.flags = 0;
  switch (t.op) {
    case UBLK_IO_OP_READ:
      t.kind = IoKind::kRead;
      break;
    case UBLK_IO_OP_WRITE:
      t.kind = IoKind::kWrite;
      break;
    case UBLK_IO_OP_FLUSH:
      t.kind = IoKind::kFlush;
      break;
    case UBLK_IO_OP_DISCARD:
      t.kind = IoKind::kTrim;
      break;
    case UBLK_IO_OP_WRITE_ZEROES:
      t.kind = IoKind::kWriteZeroes;
      if (flags & UBLK_IO_F_NOUNMAP) t.flags |= kIoNoHole;
      break;
    default:
      return issue_cmd(t, UBLK_IO_COMMIT_AND_FETCH_REQ, -EOPNOTSUPP);
  }
  if (flags & UBLK_IO_F_FUA) t.flags |= kIoFua;
  if ((t.kind == IoKind::kRead || t.kind == IoKind::kWrite) && t.length > opts_.max_io_bytes) {
    return issue_cmd(t, UBLK_IO_COMMIT_AND_FETCH_REQ, -EINVAL);
  }
  if (opts_.auto_buf_reg) {
    // The request's pages are the ring's fixed buffer `tag`, from offset 0.
    t.fixed_buf = t.tag;
    t.buf = nullptr;
  }
  in_engine_.fetch_add(1);
  // User copy: a write's data comes from the request first.
  if (opts_.user_copy && t.kind == IoKind::kWrite && t.length > 0) return issue_copy(t);
  submit_to_engine(t);
}

void UblkQueue::submit_to_engine(Tag& t) {
  dev_->submit(*reactor_, t);
}

void UblkQueue::on_io_done(Tag& t, int result) {
  // Reads and writes report the bytes done; flush, discard and zeroes 0.
  if (result == 0 && (t.kind == IoKind::kRead || t.kind == IoKind::kWrite)) {
    result = static_cast<int>(t.length);
  }
  // User copy: a read's data goes to the request before the commit.
  if (opts_.user_copy && t.kind == IoKind::kRead && result > 0) return issue_copy(t);
  commit(t, result);
}

void UblkQueue::commit(Tag& t, int result) {
  issue_cmd(t, UBLK_IO_COMMIT_AND_FETCH_REQ, result);
  in_engine_.fetch_sub(1);
}

void UblkQueue::issue_copy(Tag& t) {
  io_uring_sqe* sqe = reactor_->sqe(&t.copy);
  uint64_t pos = UblkUserCopyPos(opts_.q_id, t.tag);
  auto len = static_cast<unsigned>(t.length);
  // The fixed file's read takes the request's data (a write), its write
  // fills the request (a read).
  if (t.kind == IoKind::kWrite) {
    io_uring_prep_read(sqe, 0, t.buf, len, pos);
  } else {
    io_uring_prep_write(sqe, 0, t.buf, len, pos);
  }
  sqe->flags |= IOSQE_FIXED_FILE;
}

void UblkQueue::on_copy(Tag& t, int res) {
  if (res != static_cast<int>(t.length)) {
    // The request is gone (device aborting) or the copy fell short: the
    // request fails, never half-done data acknowledged.
    spdlog::warn("ublk {} queue {} tag {}: user copy of {} bytes: {}", opts_.dev_id, opts_.q_id,
                 t.tag, t.length, res < 0 ? std::strerror(-res) : "short");
    return commit(t, -EIO);
  }
  if (t.kind == IoKind::kWrite) return submit_to_engine(t);
  commit(t, static_cast<int>(t.length));
}

}  // namespace rpoint
