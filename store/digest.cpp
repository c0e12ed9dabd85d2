#include "store/digest.h"

#include <openssl/evp.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <memory>

namespace rpoint::store {
namespace {

// EVP_sha256() does an implicit provider fetch on every use in OpenSSL 3;
// fetching once keeps small hashes (4 KiB tree pages) cheap.
const EVP_MD* Sha256Md() {
  static EVP_MD* md = [] {
    EVP_MD* m = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    if (m == nullptr) {
      spdlog::critical("store: OpenSSL has no SHA256");
      std::abort();
    }
    return m;
  }();
  return md;
}

struct CtxFree {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};

EVP_MD_CTX* ThreadCtx() {
  thread_local std::unique_ptr<EVP_MD_CTX, CtxFree> ctx(EVP_MD_CTX_new());
  return ctx.get();
}

// OpenSSL failing to hash memory means a broken library or out of memory: there
// is no useful way to continue, and returning a made-up digest would be worse.
[[noreturn]] void HashFailed() {
  spdlog::critical("store: SHA-256 failed inside OpenSSL");
  std::abort();
}

alignas(4096) const uint8_t kZeroBlock[64 * 1024] = {};

}  // namespace

std::string Digest::hex() const {
  static const char* kHex = "0123456789abcdef";
  std::string s(kSize * 2, '0');
  for (size_t i = 0; i < kSize; ++i) {
    s[2 * i] = kHex[b[i] >> 4];
    s[2 * i + 1] = kHex[b[i] & 15];
  }
  return s;
}

Digest Sha256Padded(const void* data, size_t len, size_t padded_len) {
  EVP_MD_CTX* c = ThreadCtx();
  if (c == nullptr || EVP_DigestInit_ex(c, Sha256Md(), nullptr) != 1) HashFailed();
  if (len > 0 && EVP_DigestUpdate(c, data, len) != 1) HashFailed();
  for (size_t left = padded_len > len ? padded_len - len : 0; left > 0;) {
    size_t n = std::min(left, sizeof(kZeroBlock));
    if (EVP_DigestUpdate(c, kZeroBlock, n) != 1) HashFailed();
    left -= n;
  }
  Digest d;
  unsigned int out_len = 0;
  if (EVP_DigestFinal_ex(c, d.b.data(), &out_len) != 1 || out_len != Digest::kSize) HashFailed();
  return d;
}

Digest Sha256(const void* data, size_t len) {
  return Sha256Padded(data, len, len);
}

bool IsAllZero(const void* data, size_t len) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (len == 0) return true;
  // Comparing the buffer with itself shifted by one byte checks every byte
  // against its neighbour; with p[0] == 0 all must be zero.
  return p[0] == 0 && std::memcmp(p, p + 1, len - 1) == 0;
}

}  // namespace rpoint::store
