// Digest: the SHA-256 name of every object in a store (data chunks and tree pages).
//
// The all-zero digest is reserved: it names "nothing", i.e. a hole (a chunk of
// zeroes, or a whole subtree of them). SHA-256 never yields it in practice, so
// holes need no flag and an all-hole subtree costs one zero entry in its parent.
//
// Hashing goes through OpenSSL's EVP interface (SHA-NI where the CPU has it),
// with one fetched algorithm and one context per thread, so callers may hash
// from any number of threads at once without locks.
#pragma once

#include <array>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace rpoint::store {

struct Digest {
  static constexpr size_t kSize = 32;
  std::array<uint8_t, kSize> b{};

  bool is_zero() const {
    static constexpr std::array<uint8_t, kSize> kZero{};
    return b == kZero;
  }
  // First 8 bytes as an integer: a well-mixed key for hash tables and for the
  // GC's compact mark set (a collision there only keeps garbage alive).
  uint64_t prefix() const {
    uint64_t v;
    std::memcpy(&v, b.data(), sizeof(v));
    return v;
  }
  std::string hex() const;
  std::string short_hex() const { return hex().substr(0, 16); }
  auto operator<=>(const Digest&) const = default;
};
static_assert(sizeof(Digest) == 32);

struct DigestHash {
  size_t operator()(const Digest& d) const { return static_cast<size_t>(d.prefix()); }
};

// SHA-256 of data[0, len). Safe from any thread.
Digest Sha256(const void* data, size_t len);
// SHA-256 of data[0, len) followed by (padded_len - len) zero bytes: the name of
// a disk's partial last chunk, stored padded to the chunk size.
Digest Sha256Padded(const void* data, size_t len, size_t padded_len);

// True when every byte of data[0, len) is zero (runs at memcmp speed).
bool IsAllZero(const void* data, size_t len);

}  // namespace rpoint::store
