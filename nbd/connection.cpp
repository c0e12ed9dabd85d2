#include "nbd/connection.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

namespace rpoint::nbd {
namespace {

bool IsSocket(int fd) {
  struct stat st {};
  return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

bool IsMutation(uint16_t type) {
  return type == kCmdWrite || type == kCmdTrim || type == kCmdWriteZeroes;
}

const char* NbdErrorName(uint32_t e) {
  switch (e) {
    case kEperm: return "operation not permitted";
    case kEio: return "input/output error";
    case kEnomem: return "out of memory";
    case kEinval: return "invalid argument";
    case kEnospc: return "no space left on device";
    case kEoverflow: return "value too large";
    case kEnotsup: return "operation not supported";
    case kEshutdown: return "server shutting down";
    default: return "error";
  }
}

// A Unix socket holds at most its send buffer (~200 KiB by default) unread, so a
// 1 MiB read reply would take several wake-ups of both sides to cross. Let a few
// whole replies fit. (TCP is left alone: setting SO_SNDBUF disables autotuning.)
void TuneUnixSendBuffer(int fd) {
  int domain = 0;
  socklen_t len = sizeof(domain);
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX) return;
  int want = 4 << 20;
  // SO_SNDBUFFORCE goes past net.core.wmem_max when we may; else take what is allowed.
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &want, sizeof(want)) != 0) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof(want));
  }
}

// Kernel ring ops on the socket take lengths as unsigned int.
constexpr uint64_t kMaxRecv = 1u << 30;

}  // namespace

// One request from header to sent reply. The reply is up to three pieces sent
// in order: hdr (simple reply or chunk header, plus OFFSET_DATA's offset),
// extra (error chunk or block status payload), data (READ payload).
struct Connection::Slot final : public IoRequest {
  Connection* conn = nullptr;
  Request req;
  AlignedBuffer data_buf;  // READ/WRITE data (IoRequest::buf points into it)
  uint64_t flush_mark = 0;  // FLUSH: mutations completed when it was submitted
  uint8_t hdr[kStructuredReplySize + 8] = {};
  uint32_t hdr_len = 0;
  std::string extra;  // capacity kept across requests
  const char* data = nullptr;
  uint64_t data_len = 0;
  uint64_t sent = 0;
  Slot* next = nullptr;

  void on_done(int result) override { conn->on_io_done(this, result); }
  uint64_t total() const { return hdr_len + extra.size() + data_len; }

  // iovecs for the part of the reply not yet sent; returns how many (<= 3).
  int iovecs(iovec* out) const {
    const struct {
      const void* p;
      uint64_t n;
    } seg[3] = {{hdr, hdr_len}, {extra.data(), extra.size()}, {data, data_len}};
    uint64_t skip = sent;
    int n = 0;
    for (const auto& s : seg) {
      if (s.n == 0) continue;
      if (skip >= s.n) {
        skip -= s.n;
        continue;
      }
      out[n++] = {const_cast<char*>(static_cast<const char*>(s.p)) + skip, s.n - skip};
      skip = 0;
    }
    return n;
  }
};

Connection::Connection(Reactor& reactor, UniqueFd in, UniqueFd out, NegotiatedExport exp,
                       ConnectionLimits limits, ClosedFn on_closed)
    : reactor_(reactor),
      in_(std::move(in)),
      out_(std::move(out)),
      rfd_(in_.get()),
      wfd_(out_.valid() ? out_.get() : in_.get()),
      exp_(std::move(exp)),
      use_(exp_.use ? std::move(*exp_.use) : BlockDevice::Use(exp_.device)),
      limits_(limits),
      on_closed_(std::move(on_closed)),
      pool_(limits.buffer_cache) {
  tls_ = exp_.tls.get();
  recv_socket_ = IsSocket(rfd_);
  send_socket_ = wfd_ == rfd_ ? recv_socket_ : IsSocket(wfd_);
  if (send_socket_) TuneUnixSendBuffer(wfd_);
  // Appending replies to a queued sendmsg relies on the kernel copying the
  // msghdr and iovecs when it consumes the SQE, never later.
  can_append_ = send_socket_ && !tls_ && (reactor_.ring()->features & IORING_FEAT_SUBMIT_STABLE);
  ctx_.export_size = exp_.size;
  ctx_.tx_flags = exp_.tx_flags;
  ctx_.structured = exp_.structured;
  ctx_.base_allocation = exp_.base_allocation;
  ctx_.other_contexts = !exp_.contexts.empty();
  ctx_.min_block = exp_.sizes.minimum;
  ctx_.max_payload = std::max(exp_.sizes.maximum, exp_.max_request);
  caps_ = use_->caps();
  rbuf_ = AlignedBuffer(limits_.recv_buffer);
  slots_.reserve(limits_.max_slots);
  free_slots_.reserve(limits_.max_slots);
  for (unsigned i = 0; i < limits_.max_slots; ++i) {
    slots_.push_back(std::make_unique<Slot>());
    slots_.back()->conn = this;
  }
  for (auto it = slots_.rbegin(); it != slots_.rend(); ++it) free_slots_.push_back(it->get());
}

Connection::~Connection() = default;

void Connection::start() {
  if (closed_) return;  // shut down before it ever ran
  spdlog::debug("nbd: client attached to '{}' (structured={}, base:allocation={})", exp_.name,
                exp_.structured, exp_.base_allocation);
  if (rbuf_.empty()) stop_reading("out of memory");
  pump();
}

bool Connection::claim_shutdown() { return !shutdown_claimed_.exchange(true); }

void Connection::begin_shutdown() {
  if (closed_) return;
  stop_reading("server shutdown");
  maybe_finish();
}

void Connection::force_close() {
  if (closed_) return;
  spdlog::warn("nbd: forcing close of a client of '{}'", exp_.name);
  if (recv_socket_) ::shutdown(rfd_, SHUT_RDWR);
  if (send_socket_ && wfd_ != rfd_) ::shutdown(wfd_, SHUT_RDWR);
  if (send_in_flight_) io_uring_prep_cancel(reactor_.sqe(nullptr), &send_op_, 0);
  set_broken("forced close");
  maybe_finish();
}

// ---------------------------------------------------------------------------
// Receive side

void Connection::stop_reading(const char* why) {
  if (!reading_) return;
  spdlog::debug("nbd: '{}': stop reading requests: {}", exp_.name, why);
  reading_ = false;
  paused_ = false;
  if (recv_in_flight_) io_uring_prep_cancel(reactor_.sqe(nullptr), &recv_op_, 0);
}

void Connection::pump() {
  if (pumping_) return;
  pumping_ = true;
  for (;;) {
    parse();
    // Over TLS, plaintext comes from the session's input, not from the ring.
    if (!tls_ || !reading_ || paused_ || !tls_decrypt()) break;
  }
  pumping_ = false;
  if (reading_ && !paused_) arm_recv();
  // Decrypting may have staged records of its own (a TLS 1.3 KeyUpdate answer).
  if (tls_ && tls_->has_staged()) kick_send();
  maybe_finish();
}

void Connection::parse() {
  char* rb = rbuf_.data();
  while (reading_) {
    size_t avail = rend_ - rpos_;
    if (rstate_ == RecvState::kHeader) {
      if (avail < kRequestSize) break;
      if (use_->retired()) {
        stop_reading("device retired");
        break;
      }
      Request r;
      if (!ParseRequest(reinterpret_cast<uint8_t*>(rb + rpos_), &r)) {
        spdlog::warn("nbd: '{}': bad request magic; closing the connection", exp_.name);
        stop_reading("bad request magic");
        break;
      }
      if (!handle_request(r)) {
        paused_ = true;  // resumed when a slot or buffer space frees up
        break;
      }
    } else if (rstate_ == RecvState::kPayload) {
      if (avail == 0) break;
      Slot* s = payload_slot_;
      size_t n = static_cast<size_t>(std::min<uint64_t>(avail, payload_left_));
      std::memcpy(s->data_buf.data() + (s->req.length - payload_left_), rb + rpos_, n);
      rpos_ += n;
      payload_left_ -= n;
      if (payload_left_ == 0) payload_complete();
    } else {  // kSkip
      if (avail == 0) break;
      size_t n = static_cast<size_t>(std::min<uint64_t>(avail, skip_left_));
      rpos_ += n;
      skip_left_ -= n;
      if (skip_left_ == 0) rstate_ = RecvState::kHeader;
    }
  }
  if (rpos_ == rend_) rpos_ = rend_ = 0;
}

void Connection::recv_target(char** dest, uint64_t* len, bool* direct) {
  if (rstate_ == RecvState::kPayload && rpos_ == rend_) {
    // The rest of a write payload goes straight into its aligned buffer.
    Slot* s = payload_slot_;
    *dest = s->data_buf.data() + (s->req.length - payload_left_);
    *len = payload_left_;
    *direct = true;
  } else {
    if (rpos_ > 0) {
      // Only a partial header (< 28 bytes) can be left here.
      std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rend_ - rpos_);
      rend_ -= rpos_;
      rpos_ = 0;
    }
    *dest = rbuf_.data() + rend_;
    *len = rbuf_.capacity() - rend_;
    *direct = false;
  }
  *len = std::min(*len, kMaxRecv);
}

void Connection::account_recv(uint64_t n, bool direct) {
  if (direct) {
    payload_left_ -= n;
    if (payload_left_ == 0) payload_complete();
  } else {
    rend_ += static_cast<size_t>(n);
  }
}

bool Connection::tls_decrypt() {
  char* dest;
  uint64_t len;
  bool direct;
  recv_target(&dest, &len, &direct);
  if (len == 0) return false;
  ssize_t n = tls_->recv(dest, len);
  if (n > 0) {
    account_recv(static_cast<uint64_t>(n), direct);
    return true;
  }
  if (n == 0) {
    stop_reading("client ended the TLS session");
  } else if (n == TlsSession::kError) {
    spdlog::debug("nbd: '{}': {}", exp_.name, tls_->error());
    stop_reading("TLS error");
  }
  return false;  // kAgain: arm_recv() fetches more ciphertext
}

void Connection::arm_recv() {
  if (recv_in_flight_ || !reading_) return;
  char* dest;
  uint64_t len;
  int flags = 0;
  if (tls_) {
    size_t room = 0;
    dest = tls_->input_space(&room);
    len = std::min<uint64_t>(room, kMaxRecv);
    recv_direct_ = false;
    if (len == 0) {
      stop_reading("TLS input buffer full");  // cannot happen: pump() drains it
      return;
    }
  } else {
    recv_target(&dest, &len, &recv_direct_);
    if (recv_direct_) flags = MSG_WAITALL;
  }
  io_uring_sqe* sqe = reactor_.sqe(&recv_op_);
  if (recv_socket_) {
    io_uring_prep_recv(sqe, rfd_, dest, len, flags);
  } else {
    io_uring_prep_read(sqe, rfd_, dest, static_cast<unsigned>(len), static_cast<uint64_t>(-1));
  }
  io_uring_sqe_set_data(sqe, &recv_op_);
  recv_in_flight_ = true;
}

void Connection::on_recv(int res) {
  recv_in_flight_ = false;
  if (res == -EAGAIN || res == -EINTR) {
    pump();
    return;
  }
  if (res <= 0) {
    if (res == 0) {
      stop_reading("client closed the connection");
    } else if (res != -ECANCELED) {
      spdlog::debug("nbd: '{}': receive failed: {}", exp_.name, std::strerror(-res));
      stop_reading("receive error");
    }
    maybe_finish();
    return;
  }
  if (!reading_) {
    maybe_finish();  // data that raced with a stop is dropped
    return;
  }
  if (tls_) {
    tls_->commit_input(static_cast<size_t>(res));
  } else {
    account_recv(static_cast<uint64_t>(res), recv_direct_);
  }
  pump();
}

bool Connection::handle_request(const Request& r) {
  if (r.type == kCmdDisc) {
    rpos_ += kRequestSize;
    stop_reading("NBD_CMD_DISC");
    return true;
  }
  Verdict v = ValidateRequest(r, ctx_);
  if (r.type == kCmdWrite) {
    PayloadAction pa = WritePayloadAction(r, v, ctx_.max_payload);
    if (pa == PayloadAction::kDisconnect) {
      spdlog::warn("nbd: '{}': write of {} bytes is far above the maximum; closing", exp_.name,
                   r.length);
      rpos_ += kRequestSize;
      stop_reading("oversized write payload");
      return true;
    }
  }
  const bool needs_buf = v.ok() && (r.type == kCmdRead || r.type == kCmdWrite);
  if (free_slots_.empty()) return false;
  if (needs_buf && buffer_bytes_ > 0 &&
      buffer_bytes_ + BufferPool::ClassSize(r.length) > limits_.buffer_budget) {
    return false;
  }
  rpos_ += kRequestSize;
  Slot* s = take_slot();
  s->req = r;
  if (!v.ok()) {
    spdlog::debug("nbd: '{}': {} offset={} length={} flags={:#x}: {}", exp_.name,
                  CommandName(r.type), r.offset, r.length, r.flags, v.message);
    if (r.type == kCmdWrite) {
      rstate_ = RecvState::kSkip;
      skip_left_ = r.length;
    }
    reply_error(s, v.error, v.message);
    return true;
  }
  if (needs_buf) {
    s->data_buf = pool_.get(r.length);
    if (s->data_buf.empty()) {
      if (r.type == kCmdWrite) {
        rstate_ = RecvState::kSkip;
        skip_left_ = r.length;
      }
      reply_error(s, kEnomem, "out of memory");
      return true;
    }
    buffer_bytes_ += s->data_buf.capacity();
  }
  switch (r.type) {
    case kCmdWrite:
      payload_slot_ = s;
      payload_left_ = r.length;
      rstate_ = RecvState::kPayload;
      return true;
    case kCmdCache:
      if (!caps_.can_cache) {
        reply_ok(s);  // a hint: succeeding without caching is allowed
        return true;
      }
      break;
    case kCmdWriteZeroes:
      // FAST_ZERO: fail at once unless zeroing is known to be cheap here.
      if ((r.flags & kCmdFlagFastZero) && !use_->caps().can_fast_zero) {
        reply_error(s, kEnotsup, "fast zeroing is not available on this export");
        return true;
      }
      break;
    default:
      break;
  }
  submit(s);
  return true;
}

void Connection::payload_complete() {
  Slot* s = payload_slot_;
  payload_slot_ = nullptr;
  rstate_ = RecvState::kHeader;
  submit(s);
}

// ---------------------------------------------------------------------------
// Requests

Connection::Slot* Connection::take_slot() {
  Slot* s = free_slots_.back();
  free_slots_.pop_back();
  return s;
}

void Connection::release_slot(Slot* s) {
  if (!s->data_buf.empty()) {
    buffer_bytes_ -= s->data_buf.capacity();
    pool_.put(std::move(s->data_buf));
  }
  s->extra.clear();
  s->data = nullptr;
  s->data_len = 0;
  s->hdr_len = 0;
  s->sent = 0;
  s->next = nullptr;
  free_slots_.push_back(s);
  if (paused_ && reading_) {
    paused_ = false;
    pump();
  }
}

void Connection::submit(Slot* s) {
  const Request& r = s->req;
  uint32_t flags = 0;
  switch (r.type) {
    case kCmdRead: s->kind = IoKind::kRead; break;
    case kCmdWrite: s->kind = IoKind::kWrite; break;
    case kCmdFlush: s->kind = IoKind::kFlush; break;
    case kCmdTrim: s->kind = IoKind::kTrim; break;
    case kCmdCache: s->kind = IoKind::kCache; break;
    case kCmdWriteZeroes: s->kind = IoKind::kWriteZeroes; break;
    case kCmdBlockStatus:
      // The device answers off this thread when it must (SQLite, lseek).
      s->kind = IoKind::kBlockStatus;
      s->max_extents = (r.flags & kCmdFlagReqOne) ? 1 : limits_.max_extents;
      s->contexts = exp_.contexts.empty() ? nullptr : &exp_.contexts;
      s->context_extents.clear();  // a device that cannot answer them leaves it so
      break;
    default:
      reply_error(s, kEinval, "unknown command");
      return;
  }
  if (IsMutation(r.type) && (r.flags & kCmdFlagFua)) flags |= kIoFua;
  if (r.flags & kCmdFlagNoHole) flags |= kIoNoHole;
  if (r.flags & kCmdFlagFastZero) flags |= kIoFastZero;
  s->flags = flags;
  s->offset = r.type == kCmdFlush ? 0 : r.offset;
  s->length = r.type == kCmdFlush ? 0 : r.length;
  s->buf = (r.type == kCmdRead || r.type == kCmdWrite) ? s->data_buf.data() : nullptr;
  if (r.type == kCmdFlush) s->flush_mark = mutations_;
  ++io_in_flight_;
  use_->submit(reactor_, *s);
}

void Connection::on_io_done(Slot* s, int result) {
  --io_in_flight_;
  const Request& r = s->req;
  // A device retired while the read ran (a revoked or expired access grant, a
  // deleted point or disk) sends no more data: its bytes are no longer the
  // client's to have.
  if (result == 0 && r.type == kCmdRead && use_->retired()) result = -EACCES;
  if (result == 0) {
    if (IsMutation(r.type)) ++mutations_;
    if (r.type == kCmdFlush) flushed_mutations_ = std::max(flushed_mutations_, s->flush_mark);
  }
  if (r.type == kCmdBlockStatus) return reply_block_status(s, result);
  if (r.type == kCmdWrite && !s->data_buf.empty()) {
    // The payload is on its way to disk; its buffer can serve the next request.
    buffer_bytes_ -= s->data_buf.capacity();
    pool_.put(std::move(s->data_buf));
  }
  if (result < 0) {
    uint32_t e = ErrnoToNbd(-result);
    spdlog::debug("nbd: '{}': {} offset={} length={} failed: {}", exp_.name, CommandName(r.type),
                  r.offset, r.length, std::strerror(-result));
    reply_error(s, e, NbdErrorName(e));
  } else if (r.type == kCmdRead) {
    reply_read(s);
  } else {
    reply_ok(s);
  }
}

namespace {

// Appends one BLOCK_STATUS payload (context id, then descriptors) for a
// request of `length` bytes to p. Descriptors never reach past the request:
// REQ_ONE forbids it and the 32-bit length field could not hold more anyway.
// An empty map (base:allocation only) becomes one "allocated" descriptor,
// always a safe answer there.
void AppendBlockStatus(std::string& p, uint32_t id, const std::vector<Extent>& extents,
                       uint32_t flag_mask, uint32_t length, bool one) {
  char d[8];
  Put32(d, id);
  p.append(d, 4);
  uint64_t covered = 0;
  for (const Extent& e : extents) {
    uint64_t len = std::min<uint64_t>(e.length, length - covered);
    if (len == 0) continue;
    Put32(d, static_cast<uint32_t>(len));
    Put32(d + 4, e.flags & flag_mask);
    p.append(d, sizeof(d));
    covered += len;
    if (covered == length || one) break;
  }
  if (covered == 0) {
    Put32(d, length);
    Put32(d + 4, 0);
    p.append(d, sizeof(d));
  }
}

void PutChunkHeader(uint8_t* h, bool done, uint64_t cookie, size_t len) {
  Put32(h, kStructuredReplyMagic);
  Put16(h + 4, done ? kReplyFlagDone : 0);
  Put16(h + 6, kReplyTypeBlockStatus);
  Put64(h + 8, cookie);
  Put32(h + 16, static_cast<uint32_t>(len));
}

}  // namespace

void Connection::reply_block_status(Slot* s, int result) {
  const Request& r = s->req;
  const bool one = r.flags & kCmdFlagReqOne;
  const size_t nctx = exp_.contexts.size();
  if (result == 0 && s->context_extents.size() != nctx) result = -EIO;  // unanswered context
  if (result < 0) {
    spdlog::debug("nbd: '{}': block status failed: {}", exp_.name, std::strerror(-result));
    // "Unknown" is not expressible for a changed-block context (0 there
    // means unchanged), so only a base:allocation-only answer survives a
    // failure; otherwise the client gets the error.
    if (nctx > 0) return reply_error(s, ErrnoToNbd(-result), NbdErrorName(ErrnoToNbd(-result)));
    s->extents.clear();
  }
  // One chunk per selected context, the last one flagged DONE: the first
  // chunk's header goes in hdr, each further chunk (header + payload) follows
  // the first payload in extra.
  std::string& p = s->extra;
  p.clear();
  bool first = true;
  auto chunk = [&](uint32_t id, const std::vector<Extent>& ext, uint32_t mask, bool last) {
    size_t at = p.size();
    if (!first) p.append(kStructuredReplySize, '\0');
    AppendBlockStatus(p, id, ext, mask, r.length, one);
    if (first) {
      PutChunkHeader(s->hdr, last, r.cookie, p.size());
      first = false;
    } else {
      PutChunkHeader(reinterpret_cast<uint8_t*>(p.data() + at), last, r.cookie,
                     p.size() - at - kStructuredReplySize);
    }
  };
  if (exp_.base_allocation) {
    chunk(exp_.base_allocation_id, s->extents, kStateHole | kStateZero, nctx == 0);
  }
  for (size_t i = 0; i < nctx; ++i) {
    chunk(kFirstContextId + uint32_t(i), s->context_extents[i], MetaContext::kDirty,
          i + 1 == nctx);
  }
  s->hdr_len = kStructuredReplySize;
  enqueue(s);
}

// ---------------------------------------------------------------------------
// Replies

void Connection::reply_ok(Slot* s) {
  uint8_t* h = s->hdr;
  Put32(h, kSimpleReplyMagic);
  Put32(h + 4, 0);
  Put64(h + 8, s->req.cookie);
  s->hdr_len = kSimpleReplySize;
  enqueue(s);
}

void Connection::reply_read(Slot* s) {
  uint8_t* h = s->hdr;
  const Request& r = s->req;
  if (ctx_.structured) {
    Put32(h, kStructuredReplyMagic);
    Put16(h + 4, kReplyFlagDone);
    Put16(h + 6, kReplyTypeOffsetData);
    Put64(h + 8, r.cookie);
    Put32(h + 16, 8 + r.length);
    Put64(h + 20, r.offset);
    s->hdr_len = kStructuredReplySize + 8;
  } else {
    Put32(h, kSimpleReplyMagic);
    Put32(h + 4, 0);
    Put64(h + 8, r.cookie);
    s->hdr_len = kSimpleReplySize;
  }
  s->data = s->data_buf.data();
  s->data_len = r.length;
  enqueue(s);
}

void Connection::reply_error(Slot* s, uint32_t error, const char* message) {
  uint8_t* h = s->hdr;
  if (ctx_.structured) {
    // Errors go as structured chunks when negotiated (mandatory for READ,
    // preferred for the rest): the client gets a message to show.
    size_t mlen = message ? std::min(std::strlen(message), kMaxStringSize) : 0;
    std::string& p = s->extra;
    p.resize(6);
    Put32(p.data(), error);
    Put16(p.data() + 4, static_cast<uint16_t>(mlen));
    if (mlen) p.append(message, mlen);
    Put32(h, kStructuredReplyMagic);
    Put16(h + 4, kReplyFlagDone);
    Put16(h + 6, kReplyTypeError);
    Put64(h + 8, s->req.cookie);
    Put32(h + 16, static_cast<uint32_t>(p.size()));
    s->hdr_len = kStructuredReplySize;
  } else {
    Put32(h, kSimpleReplyMagic);
    Put32(h + 4, error);
    Put64(h + 8, s->req.cookie);
    s->hdr_len = kSimpleReplySize;
  }
  s->data = nullptr;
  s->data_len = 0;
  enqueue(s);
}

void Connection::enqueue(Slot* s) {
  if (broken_) {
    release_slot(s);
    maybe_finish();
    return;
  }
  s->sent = 0;
  s->next = nullptr;
  // Ride along with a sendmsg that is prepared but maybe not yet submitted: if
  // the kernel already took it, on_send() finds these bytes unsent and
  // requeues them, so correctness never depends on the timing.
  if (send_in_flight_ && can_append_ && !queue_head_ && send_niov_ + 3 <= kMaxIov &&
      send_nslots_ < kMaxIov) {
    send_niov_ += static_cast<size_t>(s->iovecs(&iov_[send_niov_]));
    send_slots_[send_nslots_++] = s;
    msg_.msg_iovlen = send_niov_;
    return;
  }
  if (queue_tail_) {
    queue_tail_->next = s;
  } else {
    queue_head_ = s;
  }
  queue_tail_ = s;
  kick_send();
}

void Connection::gather_send() {
  send_niov_ = 0;
  send_nslots_ = 0;
  while (queue_head_ && send_niov_ + 3 <= kMaxIov && send_nslots_ < kMaxIov) {
    Slot* s = queue_head_;
    queue_head_ = s->next;
    s->next = nullptr;
    send_niov_ += static_cast<size_t>(s->iovecs(&iov_[send_niov_]));
    send_slots_[send_nslots_++] = s;
  }
  if (!queue_head_) queue_tail_ = nullptr;
}

void Connection::kick_send_tls() {
  gather_send();
  tls_plain_ = 0;
  for (size_t i = 0; i < send_niov_ && tls_plain_ < kTlsBatch; ++i) {
    size_t k = std::min<size_t>(iov_[i].iov_len, kTlsBatch - tls_plain_);
    Status st = tls_->send(iov_[i].iov_base, k);
    if (!st.ok()) {
      spdlog::debug("nbd: '{}': {}", exp_.name, st.ToString());
      for (size_t j = 0; j < send_nslots_; ++j) release_slot(send_slots_[j]);
      send_nslots_ = send_niov_ = 0;
      set_broken("TLS send error");
      return;
    }
    tls_plain_ += k;
  }
  if (!tls_->start_flight()) return;  // nothing queued, nothing staged
  submit_tls_flight();
}

void Connection::submit_tls_flight() {
  io_uring_sqe* sqe = reactor_.sqe(&send_op_);
  uint64_t len = std::min<uint64_t>(tls_->flight_left(), kMaxRecv);
  char* p = const_cast<char*>(tls_->flight_data());
  if (send_socket_) {
    io_uring_prep_send(sqe, wfd_, p, len, MSG_NOSIGNAL | MSG_WAITALL);
  } else {
    io_uring_prep_write(sqe, wfd_, p, static_cast<unsigned>(len), static_cast<uint64_t>(-1));
  }
  io_uring_sqe_set_data(sqe, &send_op_);
  send_in_flight_ = true;
}

void Connection::kick_send() {
  if (send_in_flight_ || broken_) return;
  if (tls_) return kick_send_tls();
  if (!queue_head_) return;
  gather_send();
  io_uring_sqe* sqe = reactor_.sqe(&send_op_);
  if (send_socket_) {
    msg_ = msghdr{};
    msg_.msg_iov = iov_.data();
    msg_.msg_iovlen = send_niov_;
    // MSG_WAITALL: the kernel keeps sending a large reply itself as the client
    // drains the socket, instead of one short send and one completion per buffer-full.
    io_uring_prep_sendmsg(sqe, wfd_, &msg_, MSG_NOSIGNAL | MSG_WAITALL);
  } else {
    io_uring_prep_writev(sqe, wfd_, iov_.data(), static_cast<unsigned>(send_niov_),
                         static_cast<uint64_t>(-1));
  }
  io_uring_sqe_set_data(sqe, &send_op_);
  send_in_flight_ = true;
}

void Connection::on_send(int res) {
  send_in_flight_ = false;
  if (tls_ && !broken_ && (res > 0 || res == -EAGAIN || res == -EINTR)) {
    // The replies count as sent only once all their ciphertext is.
    if (res > 0) tls_->flight_done(static_cast<size_t>(res));
    if (tls_->flight_left() > 0) {
      submit_tls_flight();
      return;
    }
    res = static_cast<int>(tls_plain_);
    tls_plain_ = 0;
  }
  size_t n = send_nslots_;
  send_nslots_ = 0;
  send_niov_ = 0;
  std::array<Slot*, kMaxIov> done;
  size_t ndone = 0;
  if (broken_) {
    for (size_t i = 0; i < n; ++i) done[ndone++] = send_slots_[i];
  } else if (res < 0 && res != -EAGAIN && res != -EINTR) {
    spdlog::debug("nbd: '{}': send failed: {}", exp_.name, std::strerror(-res));
    for (size_t i = 0; i < n; ++i) done[ndone++] = send_slots_[i];
    set_broken("send error");
  } else {
    uint64_t left = res > 0 ? static_cast<uint64_t>(res) : 0;
    size_t i = 0;
    for (; i < n; ++i) {
      Slot* s = send_slots_[i];
      uint64_t rem = s->total() - s->sent;
      if (left < rem) {
        s->sent += left;
        break;
      }
      left -= rem;
      done[ndone++] = s;
    }
    if (res == 0 && i < n) {
      // Nothing written with bytes pending: the peer is gone.
      for (; i < n; ++i) done[ndone++] = send_slots_[i];
      set_broken("send wrote nothing");
    } else if (i < n) {
      // Unsent replies go back to the front of the queue, in order.
      Slot* head = send_slots_[i];
      Slot* tail = head;
      for (size_t j = i + 1; j < n; ++j) {
        tail->next = send_slots_[j];
        tail = send_slots_[j];
      }
      tail->next = queue_head_;
      if (!queue_head_) queue_tail_ = tail;
      queue_head_ = head;
    }
  }
  kick_send();
  for (size_t i = 0; i < ndone; ++i) release_slot(done[i]);
  maybe_finish();
}

void Connection::set_broken(const char* why) {
  if (broken_) return;
  broken_ = true;
  stop_reading(why);
  while (queue_head_) {
    Slot* s = queue_head_;
    queue_head_ = s->next;
    release_slot(s);
  }
  queue_tail_ = nullptr;
}

// ---------------------------------------------------------------------------
// Closing

void Connection::maybe_finish() {
  if (closed_ || reading_ || recv_in_flight_) return;
  if (payload_slot_) {
    // A write whose payload never fully arrived: it was never started.
    Slot* s = payload_slot_;
    payload_slot_ = nullptr;
    release_slot(s);
  }
  if (io_in_flight_ > 0 || send_in_flight_) return;
  if (queue_head_ && !broken_) {
    kick_send();
    return;
  }
  if (mutations_ > flushed_mutations_ && !final_flush_done_) {
    // Make everything this client wrote durable before letting go of it.
    if (!final_flush_started_) {
      final_flush_started_ = true;
      final_flush_.kind = IoKind::kFlush;
      final_flush_.flags = 0;
      final_flush_.offset = 0;
      final_flush_.length = 0;
      final_flush_.buf = nullptr;
      ++io_in_flight_;
      use_->submit(reactor_, final_flush_);
    }
    return;
  }
  if (tls_ && !broken_ && !tls_bye_) {
    // close_notify: the client sees a clean end of the session, not a cut.
    tls_bye_ = true;
    tls_->close_notify();
    kick_send();
    if (send_in_flight_) return;
  }
  close_now();
}

void Connection::on_final_flush(int result) {
  --io_in_flight_;
  final_flush_done_ = true;
  if (result < 0) {
    spdlog::warn("nbd: '{}': flush at disconnect failed: {}", exp_.name, std::strerror(-result));
  }
  maybe_finish();
}

void Connection::close_now() {
  closed_ = true;
  in_.reset();
  out_.reset();
  spdlog::debug("nbd: client detached from '{}'", exp_.name);
  // Destruction happens on a later loop iteration, well clear of the ring
  // callback that led here.
  ClosedFn fn = on_closed_;
  reactor_.post([fn, self = this] { fn(self); });
}

}  // namespace rpoint::nbd
