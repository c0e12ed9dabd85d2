// Unit tests of the NBD protocol layer: constants against proto.md, request
// parsing and validation, option payload parsing, advertised flags and sizes,
// the data buffer pool, and the handshake driven over a socketpair.
#include <doctest/doctest.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "nbd/buffer_pool.h"
#include "nbd/handshake.h"
#include "nbd/options.h"
#include "nbd/protocol.h"
#include "nbd/request.h"

using namespace rpoint;
using namespace rpoint::nbd;

namespace {

std::vector<uint8_t> Bytes(std::initializer_list<int> v) {
  std::vector<uint8_t> out;
  for (int b : v) out.push_back(static_cast<uint8_t>(b));
  return out;
}

void Append32(std::vector<uint8_t>& v, uint32_t x) {
  uint8_t b[4];
  Put32(b, x);
  v.insert(v.end(), b, b + 4);
}
void Append16(std::vector<uint8_t>& v, uint16_t x) {
  uint8_t b[2];
  Put16(b, x);
  v.insert(v.end(), b, b + 2);
}
void Append64(std::vector<uint8_t>& v, uint64_t x) {
  uint8_t b[8];
  Put64(b, x);
  v.insert(v.end(), b, b + 8);
}
void AppendStr(std::vector<uint8_t>& v, const std::string& s) { v.insert(v.end(), s.begin(), s.end()); }

bool Has(uint16_t flags, uint16_t bit) { return (flags & bit) != 0; }

TransmissionContext RwContext(uint64_t size = 1 << 20) {
  TransmissionContext c;
  c.export_size = size;
  DeviceCaps caps;
  caps.can_trim = caps.can_zero = caps.can_fast_zero = caps.can_cache = true;
  c.tx_flags = TransmissionFlags(caps, true);
  c.structured = true;
  c.base_allocation = true;
  c.min_block = 1;
  c.max_payload = 32u << 20;
  return c;
}

Request Req(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0) {
  Request r;
  r.type = type;
  r.offset = offset;
  r.length = length;
  r.flags = flags;
  r.cookie = 0x1122334455667788ull;
  return r;
}

}  // namespace

TEST_CASE("big-endian helpers") {
  uint8_t b[8];
  Put16(b, 0x1234);
  CHECK(b[0] == 0x12);
  CHECK(b[1] == 0x34);
  CHECK(Get16(b) == 0x1234);
  Put32(b, 0x25609513);
  CHECK(std::memcmp(b, "\x25\x60\x95\x13", 4) == 0);
  CHECK(Get32(b) == 0x25609513u);
  Put64(b, 0x4e42444d41474943ull);
  CHECK(std::memcmp(b, "NBDMAGIC", 8) == 0);
  CHECK(Get64(b) == kNbdMagic);
}

TEST_CASE("constants match proto.md") {
  uint8_t b[8];
  Put64(b, kIHaveOpt);
  CHECK(std::memcmp(b, "IHAVEOPT", 8) == 0);
  CHECK(kOptReplyMagic == 0x3e889045565a9ull);
  CHECK(kRequestMagic == 0x25609513u);
  CHECK(kSimpleReplyMagic == 0x67446698u);
  CHECK(kStructuredReplyMagic == 0x668e33efu);
  CHECK(kOptExportName == 1);
  CHECK(kOptGo == 7);
  CHECK(kOptStructuredReply == 8);
  CHECK(kOptListMetaContext == 9);
  CHECK(kOptSetMetaContext == 10);
  CHECK(kOptExtendedHeaders == 11);
  CHECK(kRepErrUnsup == 0x80000001u);
  CHECK(kRepErrUnknown == 0x80000006u);
  CHECK(kRepErrTooBig == 0x80000009u);
  CHECK(kTxSendCache == 1 << 10);
  CHECK(kTxSendFastZero == 1 << 11);
  CHECK(kTxCanMultiConn == 1 << 8);
  CHECK(kReplyTypeError == 32769);
  CHECK(kReplyTypeErrorOffset == 32770);
  CHECK(kReplyTypeBlockStatus == 5);
  CHECK(kCmdFlagFastZero == 1 << 4);
  CHECK(kEshutdown == 108);
  CHECK(kEnotsup == 95);
  CHECK(kEoverflow == 75);
}

TEST_CASE("request header parsing") {
  Request in = Req(kCmdWrite, 0x0102030405060708ull, 0x0a0b0c0d, kCmdFlagFua);
  uint8_t wire[kRequestSize];
  EncodeRequest(in, wire);
  CHECK(std::memcmp(wire, "\x25\x60\x95\x13\x00\x01\x00\x01", 8) == 0);
  Request out;
  REQUIRE(ParseRequest(wire, &out));
  CHECK(out.type == kCmdWrite);
  CHECK(out.flags == kCmdFlagFua);
  CHECK(out.cookie == in.cookie);
  CHECK(out.offset == in.offset);
  CHECK(out.length == in.length);

  wire[0] ^= 0xff;
  CHECK_FALSE(ParseRequest(wire, &out));
}

TEST_CASE("valid requests pass") {
  TransmissionContext c = RwContext();
  CHECK(ValidateRequest(Req(kCmdRead, 0, 4096), c).ok());
  CHECK(ValidateRequest(Req(kCmdRead, (1 << 20) - 1, 1), c).ok());
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 1 << 20, kCmdFlagFua), c).ok());
  CHECK(ValidateRequest(Req(kCmdFlush, 0, 0), c).ok());
  CHECK(ValidateRequest(Req(kCmdTrim, 4096, 4096, kCmdFlagFua), c).ok());
  CHECK(ValidateRequest(Req(kCmdCache, 0, 65536), c).ok());
  CHECK(ValidateRequest(Req(kCmdWriteZeroes, 0, 1 << 20, kCmdFlagNoHole | kCmdFlagFua), c).ok());
  CHECK(ValidateRequest(Req(kCmdWriteZeroes, 0, 4096, kCmdFlagFastZero), c).ok());
  CHECK(ValidateRequest(Req(kCmdBlockStatus, 0, 1 << 20, kCmdFlagReqOne), c).ok());
  CHECK(ValidateRequest(Req(kCmdRead, 0, 4096, kCmdFlagDf), c).ok());
  // Clients are known to set FUA on anything; the spec says accept it.
  CHECK(ValidateRequest(Req(kCmdRead, 0, 4096, kCmdFlagFua), c).ok());
  CHECK(ValidateRequest(Req(kCmdDisc, 0, 0), c).ok());
}

TEST_CASE("range checks") {
  TransmissionContext c = RwContext(1 << 20);
  CHECK(ValidateRequest(Req(kCmdRead, 1 << 20, 1), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdRead, (1 << 20) - 4095, 4096), c).error == kEinval);
  // Offsets that overflow when the length is added.
  CHECK(ValidateRequest(Req(kCmdRead, ~0ull - 10, 4096), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWrite, ~0ull, 1), c).error == kEnospc);
  // Writes and zeroes past the end: ENOSPC; reads, trims, cache, status: EINVAL.
  CHECK(ValidateRequest(Req(kCmdWrite, 1 << 20, 512), c).error == kEnospc);
  CHECK(ValidateRequest(Req(kCmdWriteZeroes, 1 << 20, 512), c).error == kEnospc);
  CHECK(ValidateRequest(Req(kCmdTrim, 1 << 20, 512), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdCache, 1 << 20, 512), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdBlockStatus, 1 << 20, 512), c).error == kEinval);
  // Zero lengths.
  CHECK(ValidateRequest(Req(kCmdRead, 0, 0), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 0), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdBlockStatus, 0, 0), c).error == kEinval);
  // FLUSH must carry offset and length zero.
  CHECK(ValidateRequest(Req(kCmdFlush, 1, 0), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdFlush, 0, 1), c).error == kEinval);
}

TEST_CASE("size limits") {
  TransmissionContext c = RwContext(1ull << 40);
  c.max_payload = 1 << 20;
  CHECK(ValidateRequest(Req(kCmdRead, 0, (1 << 20) + 1), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWrite, 0, (1 << 20) + 1), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdCache, 0, (1 << 20) + 1), c).error == kEinval);
  // No payload: larger zero/trim/status requests are fine.
  CHECK(ValidateRequest(Req(kCmdWriteZeroes, 0, 1u << 31), c).ok());
  CHECK(ValidateRequest(Req(kCmdTrim, 0, 1u << 31), c).ok());
  CHECK(ValidateRequest(Req(kCmdBlockStatus, 0, 0xffffffffu), c).ok());

  // Oversized write payloads are read and dropped up to 32 MiB, beyond: disconnect.
  Request w = Req(kCmdWrite, 0, (1 << 20) + 1);
  CHECK(WritePayloadAction(w, ValidateRequest(w, c), c.max_payload) == PayloadAction::kSkip);
  w.length = 32u << 20;
  CHECK(WritePayloadAction(w, ValidateRequest(w, c), c.max_payload) == PayloadAction::kSkip);
  w.length = (32u << 20) + 1;
  CHECK(WritePayloadAction(w, ValidateRequest(w, c), c.max_payload) == PayloadAction::kDisconnect);
  w.length = 0xffffffffu;
  CHECK(WritePayloadAction(w, ValidateRequest(w, c), c.max_payload) == PayloadAction::kDisconnect);
  w.length = 4096;
  CHECK(WritePayloadAction(w, ValidateRequest(w, c), c.max_payload) == PayloadAction::kRead);
  w.offset = 1ull << 40;
  CHECK(WritePayloadAction(w, ValidateRequest(w, c), c.max_payload) == PayloadAction::kSkip);
}

TEST_CASE("minimum block alignment") {
  TransmissionContext c = RwContext();
  c.min_block = 512;
  CHECK(ValidateRequest(Req(kCmdRead, 512, 1024), c).ok());
  CHECK(ValidateRequest(Req(kCmdRead, 1, 512), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 513), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdTrim, 100, 512), c).error == kEinval);
}

TEST_CASE("command flag validation") {
  TransmissionContext c = RwContext();
  CHECK(ValidateRequest(Req(kCmdRead, 0, 512, 1 << 7), c).error == kEinval);  // unknown bit
  CHECK(ValidateRequest(Req(kCmdRead, 0, 512, 0x8000), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 512, kCmdFlagNoHole), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 512, kCmdFlagDf), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdRead, 0, 512, kCmdFlagReqOne), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 512, kCmdFlagFastZero), c).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdTrim, 0, 512, kCmdFlagNoHole), c).error == kEinval);

  // Flags whose transmission flag was not advertised.
  TransmissionContext simple = c;
  simple.structured = false;
  simple.tx_flags = TransmissionFlags(DeviceCaps{}, false);
  CHECK_FALSE(Has(simple.tx_flags, kTxSendDf));
  CHECK(ValidateRequest(Req(kCmdRead, 0, 512, kCmdFlagDf), simple).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdBlockStatus, 0, 512), simple).error == kEinval);

  TransmissionContext nofast = c;
  nofast.tx_flags &= static_cast<uint16_t>(~kTxSendFastZero);
  CHECK(ValidateRequest(Req(kCmdWriteZeroes, 0, 512, kCmdFlagFastZero), nofast).error == kEinval);
  CHECK(ValidateRequest(Req(kCmdWriteZeroes, 0, 512), nofast).ok());

  TransmissionContext nofua = c;
  nofua.tx_flags &= static_cast<uint16_t>(~kTxSendFua);
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 512, kCmdFlagFua), nofua).error == kEinval);

  TransmissionContext nometa = c;
  nometa.base_allocation = false;
  CHECK(ValidateRequest(Req(kCmdBlockStatus, 0, 512), nometa).error == kEinval);
}

TEST_CASE("unknown commands and read-only exports") {
  TransmissionContext c = RwContext();
  CHECK(ValidateRequest(Req(8, 0, 512), c).error == kEinval);      // NBD_CMD_RESIZE: unsupported
  CHECK(ValidateRequest(Req(0xffff, 0, 512), c).error == kEinval);
  DeviceCaps ro;
  ro.read_only = true;
  TransmissionContext r = c;
  r.tx_flags = TransmissionFlags(ro, true);
  CHECK(Has(r.tx_flags, kTxReadOnly));
  CHECK(ValidateRequest(Req(kCmdWrite, 0, 512), r).error == kEperm);
  CHECK(ValidateRequest(Req(kCmdTrim, 0, 512), r).error == kEperm);
  CHECK(ValidateRequest(Req(kCmdWriteZeroes, 0, 512), r).error == kEperm);
  CHECK(ValidateRequest(Req(kCmdRead, 0, 512), r).ok());
  CHECK(ValidateRequest(Req(kCmdFlush, 0, 0), r).ok());
}

TEST_CASE("transmission flags and block sizes") {
  DeviceCaps caps;
  caps.can_trim = caps.can_zero = true;
  uint16_t f = TransmissionFlags(caps, false);
  CHECK(Has(f, kTxHasFlags));
  CHECK(Has(f, kTxSendFlush));
  CHECK(Has(f, kTxSendFua));
  CHECK(Has(f, kTxSendTrim));
  CHECK(Has(f, kTxSendWriteZeroes));
  CHECK(Has(f, kTxSendFastZero));
  CHECK(Has(f, kTxCanMultiConn));
  CHECK(Has(f, kTxSendCache));
  CHECK_FALSE(Has(f, kTxSendDf));
  CHECK_FALSE(Has(f, kTxReadOnly));
  CHECK(Has(TransmissionFlags(caps, true), kTxSendDf));
  caps.can_zero = false;
  CHECK_FALSE(Has(TransmissionFlags(caps, true), kTxSendFastZero));  // FAST_ZERO needs WRITE_ZEROES

  DeviceCaps d;
  BlockSizes b = ComputeBlockSizes(d, 32u << 20);
  CHECK(b.minimum == 1);
  CHECK(b.preferred == 4096);
  CHECK(b.maximum == 32u << 20);
  d.min_block = 4096;
  b = ComputeBlockSizes(d, (32u << 20) + 100);
  CHECK(b.minimum == 4096);
  CHECK(b.maximum % 4096 == 0);
  d.min_block = 1 << 20;  // above the spec's 64 KiB cap
  CHECK(ComputeBlockSizes(d, 32u << 20).minimum == 65536);
  d.min_block = 3000;  // not a power of two
  CHECK(ComputeBlockSizes(d, 32u << 20).minimum == 2048);
}

TEST_CASE("errno mapping") {
  CHECK(ErrnoToNbd(EPERM) == kEperm);
  CHECK(ErrnoToNbd(EROFS) == kEperm);
  CHECK(ErrnoToNbd(EIO) == kEio);
  CHECK(ErrnoToNbd(ENOSPC) == kEnospc);
  CHECK(ErrnoToNbd(EDQUOT) == kEnospc);
  CHECK(ErrnoToNbd(EFBIG) == kEnospc);
  CHECK(ErrnoToNbd(EOPNOTSUPP) == kEnotsup);
  CHECK(ErrnoToNbd(ESHUTDOWN) == kEshutdown);
  CHECK(ErrnoToNbd(EBADF) == kEio);  // anything else
}

TEST_CASE("INFO/GO payload parsing") {
  std::vector<uint8_t> d;
  Append32(d, 5);
  AppendStr(d, "disk1");
  Append16(d, 2);
  Append16(d, kInfoBlockSize);
  Append16(d, kInfoName);
  InfoRequest r;
  REQUIRE(ParseInfoRequest(d.data(), d.size(), &r));
  CHECK(r.name == "disk1");
  REQUIRE(r.infos.size() == 2);
  CHECK(r.infos[0] == kInfoBlockSize);

  CHECK_FALSE(ParseInfoRequest(d.data(), d.size() - 1, &r));  // truncated list
  std::vector<uint8_t> extra = d;
  extra.push_back(0);
  CHECK_FALSE(ParseInfoRequest(extra.data(), extra.size(), &r));  // trailing byte
  CHECK_FALSE(ParseInfoRequest(d.data(), 3, &r));

  std::vector<uint8_t> lie;
  Append32(lie, 0xffffffffu);  // name length beyond the option
  Append16(lie, 0);
  CHECK_FALSE(ParseInfoRequest(lie.data(), lie.size(), &r));

  std::vector<uint8_t> big;
  Append32(big, 4097);
  big.resize(big.size() + 4097, 'a');
  Append16(big, 0);
  CHECK_FALSE(ParseInfoRequest(big.data(), big.size(), &r));  // names are at most 4096 bytes

  std::vector<uint8_t> empty;
  Append32(empty, 0);
  Append16(empty, 0);
  REQUIRE(ParseInfoRequest(empty.data(), empty.size(), &r));
  CHECK(r.name.empty());
}

TEST_CASE("metadata context requests") {
  std::vector<uint8_t> d;
  Append32(d, 4);
  AppendStr(d, "disk");
  Append32(d, 2);
  Append32(d, 15);
  AppendStr(d, "base:allocation");
  Append32(d, 19);
  AppendStr(d, "qemu:dirty-bitmap:x");
  MetaContextRequest m;
  REQUIRE(ParseMetaContextRequest(d.data(), d.size(), &m));
  CHECK(m.export_name == "disk");
  REQUIRE(m.queries.size() == 2);
  CHECK(SelectsBaseAllocation(m, MetaMode::kSet));
  CHECK(SelectsBaseAllocation(m, MetaMode::kList));

  CHECK_FALSE(ParseMetaContextRequest(d.data(), d.size() - 1, &m));
  std::vector<uint8_t> huge;
  Append32(huge, 0);
  Append32(huge, 0x40000000u);  // absurd query count
  CHECK_FALSE(ParseMetaContextRequest(huge.data(), huge.size(), &m));

  MetaContextRequest q;
  q.export_name = "disk";
  // No queries: LIST returns everything, SET selects nothing.
  CHECK(SelectsBaseAllocation(q, MetaMode::kList));
  CHECK_FALSE(SelectsBaseAllocation(q, MetaMode::kSet));
  // "base:" is a wildcard for LIST only.
  q.queries = {"base:"};
  CHECK(SelectsBaseAllocation(q, MetaMode::kList));
  CHECK_FALSE(SelectsBaseAllocation(q, MetaMode::kSet));
  // Unknown leaf names and namespaces are ignored.
  q.queries = {"base:nope", "x-foo:bar", "nonsense"};
  CHECK_FALSE(SelectsBaseAllocation(q, MetaMode::kList));
  CHECK_FALSE(SelectsBaseAllocation(q, MetaMode::kSet));
}

TEST_CASE("rpoint: context queries: namespace and leaf-prefix wildcards, exact names") {
  MetaContextRequest q;
  q.export_name = "c/rp2/a";
  const std::string name = "rpoint:changed:c/rp1";
  // No queries: LIST wants every context.
  CHECK(WantsResolverContexts(q));
  CHECK(ListQueryMatches(q, name));
  for (const char* wild : {"rpoint:", "rpoint:changed:", "rpoint:changed:c/rp1"}) {
    q.queries = {wild};
    CHECK(WantsResolverContexts(q));
    CHECK(ListQueryMatches(q, name));
  }
  q.queries = {"base:allocation", "rpoint:changed:c/rp", "rpoint:other:", "x:rpoint:"};
  CHECK(WantsResolverContexts(q));  // rpoint: queries present, none of them matching
  CHECK_FALSE(ListQueryMatches(q, name));
  q.queries = {"base:", "qemu:dirty-bitmap:x"};
  CHECK_FALSE(WantsResolverContexts(q));
  CHECK(IsResolverContextQuery("rpoint:changed:c/rp1"));
  CHECK_FALSE(IsResolverContextQuery("base:allocation"));
}

TEST_CASE("buffer pool") {
  CHECK(BufferPool::ClassSize(1) == 4096);
  CHECK(BufferPool::ClassSize(4096) == 4096);
  CHECK(BufferPool::ClassSize(4097) == 8192);
  CHECK(BufferPool::ClassSize((1 << 20) + 1) == 2u << 20);
  BufferPool pool(1 << 20);
  AlignedBuffer a = pool.get(5000);
  REQUIRE_FALSE(a.empty());
  CHECK(a.capacity() == 8192);
  CHECK(reinterpret_cast<uintptr_t>(a.data()) % 4096 == 0);
  char* p = a.data();
  pool.put(std::move(a));
  CHECK(a.empty());
  CHECK(pool.cached_bytes() == 8192);
  AlignedBuffer b = pool.get(8000);
  CHECK(b.data() == p);  // recycled
  CHECK(pool.cached_bytes() == 0);
  AlignedBuffer big = pool.get(2 << 20);
  pool.put(std::move(big));  // over the cache budget: freed
  CHECK(pool.cached_bytes() == 0);
}

// ---------------------------------------------------------------------------
// Handshake over a socketpair: the client's bytes are written up front (they
// fit the socket buffer), Negotiate() runs, then the server's bytes are parsed.

namespace {

class FakeDevice : public BlockDevice {
 public:
  FakeDevice(std::string name, uint64_t size, bool ro) : name_(std::move(name)), size_(size) {
    caps_.read_only = ro;
    caps_.can_trim = caps_.can_zero = !ro;
  }
  const std::string& name() const override { return name_; }
  uint64_t size() const override { return size_; }
  DeviceCaps caps() const override { return caps_; }
  void submit(Reactor&, IoRequest&) override {}
  Result<std::vector<Extent>> block_status(uint64_t, uint64_t length, size_t) override {
    return std::vector<Extent>{{length, 0}};
  }
  void on_completion(Reactor&, IoRequest&, int) override {}

 private:
  std::string name_;
  uint64_t size_;
  DeviceCaps caps_;
};

class FakeResolver : public ExportResolver {
 public:
  FakeResolver() {
    devs_.push_back(std::make_shared<FakeDevice>("disk", 1 << 20, false));
    devs_.push_back(std::make_shared<FakeDevice>("ro", 4096, true));
  }
  std::shared_ptr<BlockDevice> find_export(const std::string& name) override {
    for (auto& d : devs_) {
      if (d->name() == name) return d;
    }
    return nullptr;
  }
  std::vector<ExportInfo> list_exports() override {
    return {{"disk", "a disk"}, {"ro", ""}};
  }
  std::vector<std::shared_ptr<FakeDevice>> devs_;
};

struct OptReply {
  uint32_t option = 0;
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

class HandshakeHarness {
 public:
  HandshakeHarness() {
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    server_.reset(sv[0]);
    client_.reset(sv[1]);
  }
  void send(const std::vector<uint8_t>& b) {
    REQUIRE(::write(client_.get(), b.data(), b.size()) == static_cast<ssize_t>(b.size()));
  }
  Result<NegotiatedExport> run(uint32_t client_flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes,
                               bool send_flags = true) {
    if (send_flags) {
      std::vector<uint8_t> f;
      Append32(f, client_flags);
      // Client flags go first on the wire; options queued before were written after.
      pending_.insert(pending_.begin(), f.begin(), f.end());
    }
    send(pending_);
    ::shutdown(client_.get(), SHUT_WR);  // the server sees EOF after the script
    HandshakeChannel ch(server_.get(), server_.get(), -1,
                        std::chrono::steady_clock::now() + std::chrono::seconds(5));
    auto r = Negotiate(ch, resolver_, 32u << 20, tls_);
    server_.reset();  // the client reads everything, then EOF
    std::vector<uint8_t> all;
    uint8_t buf[65536];
    ssize_t n;
    while ((n = ::read(client_.get(), buf, sizeof(buf))) > 0) all.insert(all.end(), buf, buf + n);
    out_ = all;
    return r;
  }
  // Queue an option (sent when run() starts, after the client flags).
  void queue(uint32_t opt, const std::vector<uint8_t>& data = {}) {
    Append64(pending_, kIHaveOpt);
    Append32(pending_, opt);
    Append32(pending_, static_cast<uint32_t>(data.size()));
    pending_.insert(pending_.end(), data.begin(), data.end());
  }
  void queue_raw(const std::vector<uint8_t>& b) { pending_.insert(pending_.end(), b.begin(), b.end()); }

  // Parses server output after the 18-byte greeting into option replies.
  std::vector<OptReply> replies(size_t trailing = 0) const {
    std::vector<OptReply> r;
    REQUIRE(out_.size() >= kGreetingSize);
    size_t pos = kGreetingSize;
    while (out_.size() - pos - trailing >= kOptionReplyHeaderSize) {
      REQUIRE(Get64(&out_[pos]) == kOptReplyMagic);
      OptReply o;
      o.option = Get32(&out_[pos + 8]);
      o.type = Get32(&out_[pos + 12]);
      uint32_t len = Get32(&out_[pos + 16]);
      pos += kOptionReplyHeaderSize;
      REQUIRE(out_.size() - pos >= len);
      o.data.assign(out_.begin() + pos, out_.begin() + pos + len);
      pos += len;
      r.push_back(o);
    }
    return r;
  }
  const std::vector<uint8_t>& out() const { return out_; }
  FakeResolver resolver_;
  TlsPolicy tls_;

 private:
  UniqueFd server_, client_;
  std::vector<uint8_t> pending_;
  std::vector<uint8_t> out_;
};

std::vector<uint8_t> InfoData(const std::string& name, std::vector<uint16_t> infos = {}) {
  std::vector<uint8_t> d;
  Append32(d, static_cast<uint32_t>(name.size()));
  AppendStr(d, name);
  Append16(d, static_cast<uint16_t>(infos.size()));
  for (uint16_t i : infos) Append16(d, i);
  return d;
}

std::vector<uint8_t> MetaData(const std::string& name, std::vector<std::string> queries) {
  std::vector<uint8_t> d;
  Append32(d, static_cast<uint32_t>(name.size()));
  AppendStr(d, name);
  Append32(d, static_cast<uint32_t>(queries.size()));
  for (auto& q : queries) {
    Append32(d, static_cast<uint32_t>(q.size()));
    AppendStr(d, q);
  }
  return d;
}

}  // namespace

TEST_CASE("handshake: greeting and GO") {
  HandshakeHarness h;
  h.queue(kOptStructuredReply);
  h.queue(kOptSetMetaContext, MetaData("disk", {"base:allocation"}));
  h.queue(kOptGo, InfoData("disk", {kInfoName, kInfoBlockSize}));
  auto r = h.run();
  REQUIRE(r.ok());
  CHECK(r->name == "disk");
  CHECK(r->size == 1 << 20);
  CHECK(r->structured);
  CHECK(r->base_allocation);
  CHECK(r->base_allocation_id == kBaseAllocationId);
  CHECK(Has(r->tx_flags, kTxSendDf));

  const auto& out = h.out();
  CHECK(Get64(&out[0]) == kNbdMagic);
  CHECK(Get64(&out[8]) == kIHaveOpt);
  CHECK(Get16(&out[16]) == (kFlagFixedNewstyle | kFlagNoZeroes));
  auto reps = h.replies();
  REQUIRE(reps.size() >= 5);
  CHECK(reps[0].option == kOptStructuredReply);
  CHECK(reps[0].type == kRepAck);
  CHECK(reps[1].type == kRepMetaContext);
  CHECK(Get32(reps[1].data.data()) == kBaseAllocationId);
  CHECK(std::string(reps[1].data.begin() + 4, reps[1].data.end()) == "base:allocation");
  CHECK(reps[2].type == kRepAck);
  bool saw_export = false, saw_name = false, saw_bs = false;
  for (size_t i = 3; i + 1 < reps.size(); ++i) {
    REQUIRE(reps[i].type == kRepInfo);
    uint16_t t = Get16(reps[i].data.data());
    if (t == kInfoExport) {
      saw_export = true;
      REQUIRE(reps[i].data.size() == 12);
      CHECK(Get64(&reps[i].data[2]) == 1 << 20);
    } else if (t == kInfoName) {
      saw_name = true;
      CHECK(std::string(reps[i].data.begin() + 2, reps[i].data.end()) == "disk");
    } else if (t == kInfoBlockSize) {
      saw_bs = true;
      REQUIRE(reps[i].data.size() == 14);
      CHECK(Get32(&reps[i].data[2]) == 1);
      CHECK(Get32(&reps[i].data[6]) == 4096);
      CHECK(Get32(&reps[i].data[10]) == 32u << 20);
    }
  }
  CHECK(saw_export);
  CHECK(saw_name);
  CHECK(saw_bs);
  CHECK(reps.back().type == kRepAck);
  CHECK(reps.back().option == kOptGo);
}

TEST_CASE("handshake: errors keep haggling going") {
  HandshakeHarness h;
  h.queue(kOptGo, InfoData("nope"));                                  // unknown export
  h.queue(kOptGo, InfoData(""));                                      // no default export
  h.queue(kOptSetMetaContext, MetaData("disk", {"base:allocation"})); // before STRUCTURED_REPLY
  h.queue(kOptStartTls);                                              // no TLS
  h.queue(kOptExtendedHeaders);                                       // not supported
  h.queue(0x12345);                                                   // unknown option
  h.queue(kOptList, {1, 2, 3});                                       // LIST takes no data
  h.queue(kOptGo, {0, 0});                                            // malformed
  h.queue(kOptStructuredReply, {1});                                  // takes no data
  h.queue(kOptList);
  h.queue(kOptAbort);
  auto r = h.run();
  CHECK_FALSE(r.ok());
  auto reps = h.replies();
  REQUIRE(reps.size() == 13);
  CHECK(reps[0].type == kRepErrUnknown);
  CHECK(reps[1].type == kRepErrUnknown);
  CHECK(reps[2].type == kRepErrInvalid);
  CHECK((reps[3].type == kRepErrUnsup || reps[3].type == kRepErrPolicy));
  CHECK(reps[4].type == kRepErrUnsup);
  CHECK(reps[5].type == kRepErrUnsup);
  CHECK(reps[5].option == 0x12345u);
  CHECK(reps[6].type == kRepErrInvalid);
  CHECK(reps[7].type == kRepErrInvalid);
  CHECK(reps[8].type == kRepErrInvalid);
  // LIST: one NBD_REP_SERVER per export, then ACK.
  CHECK(reps[9].type == kRepServer);
  CHECK(Get32(reps[9].data.data()) == 4);
  CHECK(std::string(reps[9].data.begin() + 4, reps[9].data.begin() + 8) == "disk");
  CHECK(std::string(reps[9].data.begin() + 8, reps[9].data.end()) == "a disk");
  CHECK(reps[10].type == kRepServer);
  CHECK(reps[11].type == kRepAck);
  CHECK(reps[12].option == kOptAbort);
  CHECK(reps[12].type == kRepAck);
}

TEST_CASE("handshake: a TLS-only listener answers plaintext options with TLS_REQD") {
  HandshakeHarness h;
  h.tls_.mode = TlsMode::kRequire;  // no credentials needed to refuse
  h.queue(kOptGo, InfoData("disk"));
  h.queue(kOptInfo, InfoData("disk"));
  h.queue(kOptList);
  h.queue(kOptStructuredReply);
  h.queue(kOptListMetaContext, MetaData("disk", {}));
  h.queue(0x12345);
  h.queue(kOptAbort);
  CHECK_FALSE(h.run().ok());
  auto reps = h.replies();
  REQUIRE(reps.size() == 7);
  for (size_t i = 0; i < 6; ++i) {
    INFO(i);
    CHECK(reps[i].type == kRepErrTlsReqd);
  }
  CHECK(reps[6].type == kRepAck);
  // EXPORT_NAME cannot be refused with an error: the connection is closed.
  HandshakeHarness e;
  e.tls_.mode = TlsMode::kRequire;
  e.queue(kOptExportName, {'d', 'i', 's', 'k'});
  auto r = e.run();
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == Code::kPermissionDenied);
  CHECK(e.out().size() == kGreetingSize);  // nothing but the greeting
}

TEST_CASE("handshake: clients that never asked for block sizes may send 64 MiB") {
  HandshakeHarness a;
  a.queue(kOptGo, InfoData("disk", {kInfoBlockSize}));
  auto ra = a.run();
  REQUIRE(ra.ok());
  CHECK(ra.value().max_request == 32u << 20);
  HandshakeHarness b;
  b.queue(kOptGo, InfoData("disk"));
  auto rb = b.run();
  REQUIRE(rb.ok());
  CHECK(rb.value().max_request == kUnnegotiatedMaxRequest);
  HandshakeHarness c;
  c.queue(kOptExportName, {'d', 'i', 's', 'k'});
  auto rc = c.run();
  REQUIRE(rc.ok());
  CHECK(rc.value().max_request == kUnnegotiatedMaxRequest);
}

TEST_CASE("handshake: list meta contexts") {
  HandshakeHarness h;
  h.queue(kOptStructuredReply);
  h.queue(kOptListMetaContext, MetaData("disk", {}));
  h.queue(kOptListMetaContext, MetaData("disk", {"base:"}));
  h.queue(kOptListMetaContext, MetaData("disk", {"x-other:thing"}));
  h.queue(kOptSetMetaContext, MetaData("disk", {"x-other:thing"}));
  h.queue(kOptListMetaContext, MetaData("nope", {}));
  h.queue(kOptAbort);
  CHECK_FALSE(h.run().ok());
  auto reps = h.replies();
  REQUIRE(reps.size() == 9);
  CHECK(reps[1].type == kRepMetaContext);
  CHECK(reps[2].type == kRepAck);
  CHECK(reps[3].type == kRepMetaContext);
  CHECK(reps[4].type == kRepAck);
  CHECK(reps[5].type == kRepAck);  // unknown namespace: ignored, nothing listed
  CHECK(reps[6].type == kRepAck);  // nothing selected, not an error
  CHECK(reps[7].type == kRepErrUnknown);
}

TEST_CASE("handshake: meta context for another export does not carry over") {
  HandshakeHarness h;
  h.queue(kOptStructuredReply);
  h.queue(kOptSetMetaContext, MetaData("ro", {"base:allocation"}));
  h.queue(kOptGo, InfoData("disk"));
  auto r = h.run();
  REQUIRE(r.ok());
  CHECK(r->structured);
  CHECK_FALSE(r->base_allocation);
}

TEST_CASE("handshake: EXPORT_NAME with and without NO_ZEROES") {
  for (bool no_zeroes : {true, false}) {
    HandshakeHarness h;
    std::vector<uint8_t> name;
    AppendStr(name, "ro");
    h.queue(kOptExportName, name);
    auto r = h.run(kClientFlagFixedNewstyle | (no_zeroes ? kClientFlagNoZeroes : 0));
    REQUIRE(r.ok());
    CHECK(r->name == "ro");
    CHECK(Has(r->tx_flags, kTxReadOnly));
    const auto& out = h.out();
    REQUIRE(out.size() == kGreetingSize + 10 + (no_zeroes ? 0 : 124));
    CHECK(Get64(&out[kGreetingSize]) == 4096);
    CHECK(Get16(&out[kGreetingSize + 8]) == r->tx_flags);
  }
}

TEST_CASE("handshake: protocol violations end the session") {
  SUBCASE("unknown client flags") {
    HandshakeHarness h;
    h.queue(kOptList);
    CHECK_FALSE(h.run(0x80).ok());
  }
  SUBCASE("bad option magic") {
    HandshakeHarness h;
    h.queue_raw(Bytes({'G', 'A', 'R', 'B', 'A', 'G', 'E', '!', 0, 0, 0, 1, 0, 0, 0, 0}));
    CHECK_FALSE(h.run().ok());
    CHECK(h.replies().empty());
  }
  SUBCASE("truncated option") {
    HandshakeHarness h;
    std::vector<uint8_t> b;
    Append64(b, kIHaveOpt);
    Append32(b, kOptGo);
    Append32(b, 100);
    b.push_back(0);
    h.queue_raw(b);
    CHECK_FALSE(h.run().ok());
  }
  SUBCASE("client flags never sent") {
    HandshakeHarness h;
    h.queue_raw(Bytes({0, 0}));
    CHECK_FALSE(h.run(0, false).ok());
  }
  SUBCASE("EXPORT_NAME of an unknown export") {
    HandshakeHarness h;
    std::vector<uint8_t> name;
    AppendStr(name, "missing");
    h.queue(kOptExportName, name);
    CHECK_FALSE(h.run().ok());
  }
  SUBCASE("absurd option length") {
    HandshakeHarness h;
    std::vector<uint8_t> b;
    Append64(b, kIHaveOpt);
    Append32(b, kOptInfo);
    Append32(b, 0xfffffff0u);
    h.queue_raw(b);
    CHECK_FALSE(h.run().ok());
  }
  SUBCASE("oversized but readable option gets TOO_BIG") {
    HandshakeHarness h;
    std::vector<uint8_t> data(kMaxOptionData + 1, 'x');
    h.queue(kOptInfo, data);
    h.queue(kOptAbort);
    CHECK_FALSE(h.run().ok());
    auto reps = h.replies();
    REQUIRE(reps.size() == 2);
    CHECK(reps[0].type == kRepErrTooBig);
  }
}

TEST_CASE("handshake: timeout") {
  int sv[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  UniqueFd s(sv[0]), c(sv[1]);
  FakeResolver res;
  auto start = std::chrono::steady_clock::now();
  HandshakeChannel ch(s.get(), s.get(), -1, start + std::chrono::milliseconds(200));
  auto r = Negotiate(ch, res, 32u << 20);  // the client never says anything
  CHECK_FALSE(r.ok());
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(3));
}
