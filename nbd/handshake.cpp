#include "nbd/handshake.h"

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace rpoint::nbd {
namespace {

bool IsSocket(int fd) {
  struct stat st {};
  return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

}  // namespace

HandshakeChannel::HandshakeChannel(int in_fd, int out_fd, int cancel_fd, Clock::time_point deadline)
    : in_fd_(in_fd),
      out_fd_(out_fd),
      cancel_fd_(cancel_fd),
      in_socket_(IsSocket(in_fd)),
      out_socket_(in_fd == out_fd ? in_socket_ : IsSocket(out_fd)),
      deadline_(deadline) {}

Status HandshakeChannel::wait(int fd, short events) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now());
    if (left.count() <= 0) return Status::Unsupported("handshake timed out");
    pollfd p[2] = {{fd, events, 0}, {cancel_fd_, POLLIN, 0}};
    int n = ::poll(p, cancel_fd_ >= 0 ? 2 : 1, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "poll");
    }
    if (n == 0) continue;  // re-check the deadline
    if (cancel_fd_ >= 0 && (p[1].revents & POLLIN)) return Status::Shutdown("server shutting down");
    if (p[0].revents) return Status::Ok();  // ready, or an error the next call reports
  }
}

Status HandshakeChannel::read(void* buf, size_t n) {
  if (!tls_) return raw_read(buf, n);
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = tls_->recv(p, n);
    if (r == TlsSession::kAgain) {
      Status s = tls_fill();
      if (!s.ok()) return s;
      continue;
    }
    if (r == TlsSession::kError) return Status::IoError(tls_->error());
    if (r == 0) return Status::IoError("client closed the TLS session during the handshake");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

Status HandshakeChannel::raw_read(void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    Status s = wait(in_fd_, POLLIN);
    if (!s.ok()) return s;
    ssize_t r = in_socket_ ? ::recv(in_fd_, p, n, MSG_DONTWAIT) : ::read(in_fd_, p, n);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return Status::FromErrno(errno, "handshake read");
    }
    if (r == 0) return Status::IoError("client closed the connection during the handshake");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

Status HandshakeChannel::pause(std::chrono::milliseconds how_long) {
  const Clock::time_point until = std::min(deadline_, Clock::now() + how_long);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
    if (left.count() <= 0) return Status::Ok();
    pollfd p{cancel_fd_, POLLIN, 0};
    int n = ::poll(&p, cancel_fd_ >= 0 ? 1 : 0, static_cast<int>(left.count()));
    if (n < 0 && errno != EINTR) return Status::FromErrno(errno, "poll");
    if (n > 0) return Status::Shutdown("server shutting down");
  }
}

Status HandshakeChannel::discard(size_t n) {
  char scratch[4096];
  while (n > 0) {
    size_t k = std::min(n, sizeof(scratch));
    Status s = read(scratch, k);
    if (!s.ok()) return s;
    n -= k;
  }
  return Status::Ok();
}

Status HandshakeChannel::write(const iovec* iov, int iovcnt) {
  if (!tls_) return raw_write(iov, iovcnt);
  for (int i = 0; i < iovcnt; ++i) {
    Status s = tls_->send(iov[i].iov_base, iov[i].iov_len);
    if (!s.ok()) return s;
  }
  return tls_flush();
}

Status HandshakeChannel::tls_fill() {
  // Whatever GnuTLS staged (a handshake flight, an alert) goes out before we
  // wait for the answer to it.
  Status s = tls_flush();
  if (!s.ok()) return s;
  for (;;) {
    s = wait(in_fd_, POLLIN);
    if (!s.ok()) return s;
    size_t room = 0;
    char* dst = tls_->input_space(&room);
    if (room == 0) return Status::Internal("TLS input buffer full");
    ssize_t r = in_socket_ ? ::recv(in_fd_, dst, room, MSG_DONTWAIT) : ::read(in_fd_, dst, room);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return Status::FromErrno(errno, "handshake read");
    }
    if (r == 0) return Status::IoError("client closed the connection during the handshake");
    tls_->commit_input(static_cast<size_t>(r));
    return Status::Ok();
  }
}

Status HandshakeChannel::tls_flush() {
  while (tls_->start_flight()) {
    iovec v{const_cast<char*>(tls_->flight_data()), tls_->flight_left()};
    Status s = raw_write(&v, 1);
    tls_->flight_done(v.iov_len);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

Status HandshakeChannel::start_tls(std::unique_ptr<TlsSession> session) {
  tls_ = std::move(session);
  for (;;) {
    TlsSession::Progress p = tls_->handshake();
    if (p == TlsSession::Progress::kDone) {
      Status s = tls_flush();
      if (!s.ok()) return s;
      spdlog::debug("nbd: TLS established: {}", tls_->describe());
      return Status::Ok();
    }
    if (p == TlsSession::Progress::kFailed) {
      (void)tls_flush();  // the alert tells the client why
      return Status::PermissionDenied(tls_->error());
    }
    Status s = tls_fill();
    if (!s.ok()) return s;
  }
}

Status HandshakeChannel::raw_write(const iovec* iov_in, int iovcnt) {
  iovec iov[8];
  if (iovcnt > 8) return Status::Internal("too many iovecs");
  std::memcpy(iov, iov_in, sizeof(iovec) * iovcnt);
  int first = 0;
  while (first < iovcnt) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    Status s = wait(out_fd_, POLLOUT);
    if (!s.ok()) return s;
    ssize_t w;
    if (out_socket_) {
      msghdr msg{};
      msg.msg_iov = iov + first;
      msg.msg_iovlen = iovcnt - first;
      w = ::sendmsg(out_fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
      w = ::writev(out_fd_, iov + first, iovcnt - first);
    }
    if (w < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return Status::FromErrno(errno, "handshake write");
    }
    size_t left = static_cast<size_t>(w);
    while (left > 0 && first < iovcnt) {
      size_t k = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + k;
      iov[first].iov_len -= k;
      left -= k;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return Status::Ok();
}

Status HandshakeChannel::write(const void* buf, size_t n) {
  iovec v{const_cast<void*>(buf), n};
  return write(&v, 1);
}

namespace {

// One negotiation: the state option haggling builds up.
class Negotiation {
 public:
  Negotiation(HandshakeChannel& ch, ExportResolver& resolver, uint32_t max_payload,
              const TlsPolicy& tls)
      : ch_(ch), resolver_(resolver), max_payload_(max_payload), tls_(tls) {}

  Result<NegotiatedExport> run();

 private:
  Status reply(uint32_t option, uint32_t type, const void* data = nullptr, size_t len = 0);
  Status reply_error(uint32_t option, uint32_t type, const std::string& message) {
    return reply(option, type, message.data(), std::min(message.size(), kMaxStringSize));
  }
  // Status::Ok: keep haggling. done_ set: transmission phase. Error: close.
  Status handle(uint32_t option, const std::vector<uint8_t>& data);
  Status handle_info(uint32_t option, const std::vector<uint8_t>& data);
  Status handle_list(uint32_t option, const std::vector<uint8_t>& data);
  Status handle_meta(uint32_t option, const std::vector<uint8_t>& data);
  Status handle_export_name(const std::vector<uint8_t>& data);
  Status handle_starttls(uint32_t option, const std::vector<uint8_t>& data);
  std::shared_ptr<BlockDevice> resolve(const std::string& name, std::string* why);
  void finish(std::shared_ptr<BlockDevice> dev, const std::string& name);

  HandshakeChannel& ch_;
  ExportResolver& resolver_;
  uint32_t max_payload_;
  const TlsPolicy& tls_;
  bool no_zeroes_ = false;
  bool asked_block_size_ = false;  // the GO listed NBD_INFO_BLOCK_SIZE
  bool structured_ = false;
  bool meta_selected_ = false;                               // base:allocation
  std::vector<std::shared_ptr<MetaContext>> meta_contexts_;  // ids kFirstContextId + i
  std::string meta_export_;                                  // what the last successful SET named
  bool done_ = false;
  NegotiatedExport result_;
};

Status Negotiation::reply(uint32_t option, uint32_t type, const void* data, size_t len) {
  uint8_t hdr[kOptionReplyHeaderSize];
  Put64(hdr, kOptReplyMagic);
  Put32(hdr + 8, option);
  Put32(hdr + 12, type);
  Put32(hdr + 16, static_cast<uint32_t>(len));
  iovec iov[2] = {{hdr, sizeof(hdr)}, {const_cast<void*>(data), len}};
  return ch_.write(iov, len ? 2 : 1);
}

std::shared_ptr<BlockDevice> Negotiation::resolve(const std::string& name, std::string* why) {
  // The empty name is the "default export". A daemon of named disks has no
  // natural default, and silently picking one would hand a client whatever disk
  // happens to exist, so it is refused like any unknown name.
  if (name.empty()) {
    *why = "no default export: name the disk to connect to";
    return nullptr;
  }
  if (name.find('\0') != std::string::npos) {
    *why = "export names cannot contain NUL";
    return nullptr;
  }
  std::shared_ptr<BlockDevice> dev = resolver_.find_export(name);
  if (!dev || dev->retired()) {
    // The resolver words the refusal (an access token is never echoed) and
    // may slow it down; the wait ends early on shutdown or the deadline.
    ExportResolver::Refusal r = resolver_.refuse(name);
    *why = std::move(r.message);
    if (r.delay.count() > 0) (void)ch_.pause(r.delay);
    return nullptr;
  }
  return dev;
}

void Negotiation::finish(std::shared_ptr<BlockDevice> dev, const std::string& name) {
  DeviceCaps caps = dev->caps();
  // The device's name, not the one asked for: the transmission phase logs it,
  // and an access grant's export is asked for by its secret token.
  result_.name = dev->name();
  result_.size = dev->size();
  result_.structured = structured_;
  // Contexts selected for another export do not carry over (the spec requires
  // the SET_META_CONTEXT and the GO to name the same export).
  const bool meta = structured_ && meta_export_ == name;
  result_.base_allocation = meta && meta_selected_;
  result_.base_allocation_id = result_.base_allocation ? kBaseAllocationId : 0;
  if (meta) result_.contexts = std::move(meta_contexts_);
  result_.tx_flags = TransmissionFlags(caps, structured_);
  result_.sizes = ComputeBlockSizes(caps, max_payload_);
  result_.max_request = asked_block_size_
                            ? result_.sizes.maximum
                            : std::max(result_.sizes.maximum, kUnnegotiatedMaxRequest);
  if (!result_.use) result_.use.emplace(dev);
  result_.device = std::move(dev);
  done_ = true;
}

Status Negotiation::handle_export_name(const std::vector<uint8_t>& data) {
  // EXPORT_NAME cannot report errors: anything wrong ends the session.
  if (data.size() > kMaxStringSize) return Status::InvalidArgument("export name too long");
  std::string name(data.begin(), data.end());
  std::string why;
  std::shared_ptr<BlockDevice> dev = resolve(name, &why);
  if (!dev) return Status::NotFound(why);
  finish(dev, name);
  uint8_t buf[kExportNameReplySize + kExportNameZeroes] = {};
  Put64(buf, result_.size);
  Put16(buf + 8, result_.tx_flags);
  Status s = ch_.write(buf, no_zeroes_ ? kExportNameReplySize : sizeof(buf));
  if (!s.ok()) done_ = false;
  return s;
}

Status Negotiation::handle_info(uint32_t option, const std::vector<uint8_t>& data) {
  InfoRequest req;
  if (!ParseInfoRequest(data.data(), data.size(), &req)) {
    return reply_error(option, kRepErrInvalid, "malformed INFO/GO request");
  }
  std::string why;
  std::shared_ptr<BlockDevice> dev = resolve(req.name, &why);
  if (!dev) return reply_error(option, kRepErrUnknown, why);

  DeviceCaps caps = dev->caps();
  uint16_t tx_flags = TransmissionFlags(caps, structured_);
  BlockSizes sizes = ComputeBlockSizes(caps, max_payload_);

  uint8_t info[12];
  Put16(info, kInfoExport);
  Put64(info + 2, dev->size());
  Put16(info + 10, tx_flags);
  Status s = reply(option, kRepInfo, info, sizeof(info));
  if (!s.ok()) return s;

  // Block sizes are always sent: a client that ignores them still gets the
  // defaults it assumes, one that honours them splits large requests for us.
  uint8_t bs[14];
  Put16(bs, kInfoBlockSize);
  Put32(bs + 2, sizes.minimum);
  Put32(bs + 6, sizes.preferred);
  Put32(bs + 10, sizes.maximum);
  s = reply(option, kRepInfo, bs, sizeof(bs));
  if (!s.ok()) return s;

  for (uint16_t type : req.infos) {
    if (type == kInfoName) {
      std::string payload(2, '\0');
      Put16(payload.data(), kInfoName);
      payload += dev->name();
      s = reply(option, kRepInfo, payload.data(), std::min(payload.size(), kMaxStringSize + 2));
    } else if (type == kInfoDescription) {
      std::string desc;
      for (const auto& e : resolver_.list_exports()) {
        if (e.name == req.name) desc = e.description;
      }
      if (desc.empty()) continue;
      std::string payload(2, '\0');
      Put16(payload.data(), kInfoDescription);
      payload += desc;
      s = reply(option, kRepInfo, payload.data(), std::min(payload.size(), kMaxStringSize + 2));
    }
    if (!s.ok()) return s;
  }
  std::optional<BlockDevice::Use> use;
  if (option == kOptGo) use.emplace(dev);  // before the ACK: see NegotiatedExport::use
  s = reply(option, kRepAck);
  if (!s.ok()) return s;
  if (option == kOptGo) {
    asked_block_size_ = false;
    for (uint16_t type : req.infos) asked_block_size_ |= type == kInfoBlockSize;
    result_.use = std::move(use);
    finish(dev, req.name);
  }
  return Status::Ok();
}

Status Negotiation::handle_list(uint32_t option, const std::vector<uint8_t>& data) {
  if (!data.empty()) return reply_error(option, kRepErrInvalid, "LIST takes no data");
  for (const auto& e : resolver_.list_exports()) {
    std::string payload(4, '\0');
    size_t name_len = std::min(e.name.size(), kMaxStringSize);
    Put32(payload.data(), static_cast<uint32_t>(name_len));
    payload.append(e.name, 0, name_len);
    payload.append(e.description, 0, kMaxStringSize);
    Status s = reply(option, kRepServer, payload.data(), payload.size());
    if (!s.ok()) return s;
  }
  return reply(option, kRepAck);
}

Status Negotiation::handle_meta(uint32_t option, const std::vector<uint8_t>& data) {
  const bool set = option == kOptSetMetaContext;
  if (set) {
    // SET replaces the previous selection even when it fails.
    meta_selected_ = false;
    meta_contexts_.clear();
    meta_export_.clear();
    if (!structured_) {
      return reply_error(option, kRepErrInvalid,
                         "SET_META_CONTEXT requires structured replies to be negotiated first");
    }
  }
  MetaContextRequest req;
  if (!ParseMetaContextRequest(data.data(), data.size(), &req)) {
    return reply_error(option, kRepErrInvalid, "malformed metadata context request");
  }
  std::string why;
  if (!resolve(req.export_name, &why)) return reply_error(option, kRepErrUnknown, why);
  auto send = [&](uint32_t id, const std::string& name) {
    std::string payload(4, '\0');
    Put32(payload.data(), id);
    payload.append(name, 0, kMaxStringSize);
    return reply(option, kRepMetaContext, payload.data(), payload.size());
  };
  const bool base = SelectsBaseAllocation(req, set ? MetaMode::kSet : MetaMode::kList);
  if (base) {
    Status s = send(set ? kBaseAllocationId : 0, kBaseAllocation);
    if (!s.ok()) return s;
  }
  if (set) {
    // Only exact names select; the resolver omits what the export lacks.
    for (const std::string& q : req.queries) {
      if (!IsResolverContextQuery(q) || q.back() == ':') continue;
      bool dup = false;
      for (const auto& c : meta_contexts_) dup = dup || c->name() == q;
      if (dup) continue;
      auto ctx = resolver_.open_meta_context(req.export_name, q);
      if (!ctx) {
        spdlog::debug("nbd: '{}': metadata context '{}' not offered", req.export_name, q);
        continue;
      }
      meta_contexts_.push_back(std::move(ctx));
      Status s = send(kFirstContextId + uint32_t(meta_contexts_.size() - 1), q);
      if (!s.ok()) return s;
    }
    meta_selected_ = base;
    meta_export_ = req.export_name;
  } else if (WantsResolverContexts(req)) {
    for (const std::string& name : resolver_.meta_contexts(req.export_name)) {
      if (!ListQueryMatches(req, name)) continue;
      Status s = send(0, name);
      if (!s.ok()) return s;
    }
  }
  return reply(option, kRepAck);
}

Status Negotiation::handle_starttls(uint32_t option, const std::vector<uint8_t>& data) {
  if (!data.empty()) return reply_error(option, kRepErrInvalid, "STARTTLS takes no data");
  if (tls_.mode == TlsMode::kOff || !tls_.credentials) {
    return reply_error(option, kRepErrUnsup, "TLS is not enabled on this listener");
  }
  if (ch_.tls()) return reply_error(option, kRepErrInvalid, "TLS is already negotiated");
  auto session = TlsSession::CreateServer(tls_.credentials);
  if (!session.ok()) {
    spdlog::warn("nbd: cannot start a TLS session: {}", session.status().ToString());
    return reply_error(option, kRepErrPlatform, "TLS is unavailable");
  }
  Status s = reply(option, kRepAck);
  if (!s.ok()) return s;
  s = ch_.start_tls(std::move(session).value());
  if (!s.ok()) return s;
  // Nothing negotiated in plaintext survives the upgrade (CVE-2021-3716: a
  // man in the middle could otherwise have chosen structured replies or
  // metadata contexts the client never asked for).
  structured_ = false;
  meta_selected_ = false;
  meta_contexts_.clear();
  meta_export_.clear();
  return Status::Ok();
}

Status Negotiation::handle(uint32_t option, const std::vector<uint8_t>& data) {
  if (tls_.mode == TlsMode::kRequire && !ch_.tls() && option != kOptStartTls &&
      option != kOptAbort) {
    // EXPORT_NAME cannot carry an error: the spec says close.
    if (option == kOptExportName) {
      return Status::PermissionDenied("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only listener");
    }
    return reply_error(option, kRepErrTlsReqd, "TLS is required: upgrade with NBD_OPT_STARTTLS");
  }
  switch (option) {
    case kOptExportName:
      return handle_export_name(data);
    case kOptAbort: {
      // Best effort: the client may already have gone, which is fine too.
      (void)reply(option, kRepAck);
      return Status::Shutdown("client aborted the handshake");
    }
    case kOptList:
      return handle_list(option, data);
    case kOptStartTls:
      return handle_starttls(option, data);
    case kOptInfo:
    case kOptGo:
      return handle_info(option, data);
    case kOptStructuredReply:
      if (!data.empty()) return reply_error(option, kRepErrInvalid, "STRUCTURED_REPLY takes no data");
      structured_ = true;
      return reply(option, kRepAck);
    case kOptListMetaContext:
    case kOptSetMetaContext:
      return handle_meta(option, data);
    default:
      return reply_error(option, kRepErrUnsup,
                         std::string("option ") + std::to_string(option) + " is not supported");
  }
}

Result<NegotiatedExport> Negotiation::run() {
  uint8_t greeting[kGreetingSize];
  Put64(greeting, kNbdMagic);
  Put64(greeting + 8, kIHaveOpt);
  Put16(greeting + 16, kFlagFixedNewstyle | kFlagNoZeroes);
  Status s = ch_.write(greeting, sizeof(greeting));
  if (!s.ok()) return s;

  uint8_t cf[4];
  s = ch_.read(cf, sizeof(cf));
  if (!s.ok()) return s;
  uint32_t client_flags = Get32(cf);
  // The spec: the server MUST drop the connection on unknown client flags.
  if (client_flags & ~kClientFlagsKnown) {
    return Status::InvalidArgument("unknown client flags " + std::to_string(client_flags));
  }
  no_zeroes_ = client_flags & kClientFlagNoZeroes;

  std::vector<uint8_t> data;
  while (!done_) {
    uint8_t hdr[kOptionHeaderSize];
    s = ch_.read(hdr, sizeof(hdr));
    if (!s.ok()) return s;
    if (Get64(hdr) != kIHaveOpt) return Status::InvalidArgument("bad option magic");
    uint32_t option = Get32(hdr + 8);
    uint32_t len = Get32(hdr + 12);
    if (len > kMaxOptionData) {
      // EXPORT_NAME cannot be answered with an error; absurd lengths are not worth reading.
      if (option == kOptExportName || len > kMaxSkippedOption) {
        return Status::InvalidArgument("option " + std::to_string(option) + " data too large (" +
                                       std::to_string(len) + " bytes)");
      }
      s = ch_.discard(len);
      if (!s.ok()) return s;
      s = reply_error(option, kRepErrTooBig, "option data too large");
      if (!s.ok()) return s;
      continue;
    }
    data.resize(len);
    if (len) {
      s = ch_.read(data.data(), len);
      if (!s.ok()) return s;
    }
    spdlog::trace("nbd: option {} ({} bytes)", OptionName(option), len);
    s = handle(option, data);
    if (!s.ok()) return s;
  }
  result_.tls = ch_.take_tls();
  return std::move(result_);
}

}  // namespace

Result<NegotiatedExport> Negotiate(HandshakeChannel& ch, ExportResolver& resolver,
                                   uint32_t max_payload, const TlsPolicy& tls) {
  Negotiation n(ch, resolver, max_payload, tls);
  return n.run();
}

}  // namespace rpoint::nbd
