// CRC-32C (common/crc32c.h): the published check values, chaining, and the
// instruction path agreeing with the table on every length and alignment.
#include "common/crc32c.h"

#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace rpoint;

TEST_CASE("crc32c: known answers") {
  // RFC 3720 (iSCSI) B.4 and the usual "123456789" check value.
  CHECK(Crc32c(0, "123456789", 9) == 0xE3069283u);
  CHECK(Crc32cPortable(0, "123456789", 9) == 0xE3069283u);
  std::vector<unsigned char> zeros(32, 0), ones(32, 0xff), inc(32);
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<unsigned char>(i);
  CHECK(Crc32c(0, zeros.data(), 32) == 0x8A9136AAu);
  CHECK(Crc32c(0, ones.data(), 32) == 0x62A8AB43u);
  CHECK(Crc32c(0, inc.data(), 32) == 0x46DD794Eu);
  CHECK(Crc32c(0, nullptr, 0) == 0u);
}

TEST_CASE("crc32c: chained pieces, any alignment, both paths agree") {
  std::mt19937 rng(3);
  std::vector<unsigned char> buf(9000);
  for (auto& c : buf) c = static_cast<unsigned char>(rng());
  for (size_t start = 0; start < 9; ++start) {
    for (size_t len :
         {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{63}, size_t{4096}, size_t{8991}}) {
      uint32_t whole = Crc32c(0, buf.data() + start, len);
      CHECK(whole == Crc32cPortable(0, buf.data() + start, len));
      size_t cut = len / 3;
      CHECK(Crc32c(Crc32c(0, buf.data() + start, cut), buf.data() + start + cut, len - cut) ==
            whole);
    }
  }
  // A single flipped bit always changes it.
  uint32_t c0 = Crc32c(0, buf.data(), 4096);
  for (size_t bit = 0; bit < 4096 * 8; bit += 61) {
    buf[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
    CHECK(Crc32c(0, buf.data(), 4096) != c0);
    buf[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
  }
}
