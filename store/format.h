// The store's on-disk constants and layouts (see docs/store.md for the prose).
//
// Everything here is little-endian, fixed-size and versioned, so that a region
// directory can be checked, and its chunk index rebuilt, from the pack files
// alone. Nothing in this header does I/O.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>

#include "store/digest.h"

namespace rpoint::store {

// --- Disk image map (the tree of digest pages) -------------------------------
// A page holds kFanout digests of the level below; level 0 are chunk digests
// (one per chunk slot of the disk), the single page at the top level is the
// root. 128 x 32 bytes = one 4 KiB page: a changed slot costs at most
// depth pages, and a 1 TiB disk at 64 KiB chunks is only 4 levels deep.
constexpr uint32_t kFanout = 128;
constexpr uint32_t kFanoutShift = 7;
constexpr uint32_t kPageBytes = kFanout * sizeof(Digest);
static_assert(kPageBytes == 4096);
static_assert((1u << kFanoutShift) == kFanout);

struct Page {
  std::array<Digest, kFanout> e{};
  bool is_zero() const {
    for (const Digest& d : e) {
      if (!d.is_zero()) return false;
    }
    return true;
  }
};
static_assert(sizeof(Page) == kPageBytes);

// Number of page levels needed to map `slots` chunk slots (at least 1).
inline uint32_t TreeDepth(uint64_t slots) {
  uint32_t depth = 1;
  uint64_t cover = kFanout;
  while (cover < slots) {
    cover <<= kFanoutShift;
    ++depth;
  }
  return depth;
}

// --- Chunk sizes ---------------------------------------------------------------
// Chunks are the disk's tracking granularity. They must be a power of two and a
// multiple of 4 KiB so every object in a pack stays 4 KiB aligned.
constexpr uint32_t kMinChunkSize = 4096;
constexpr uint32_t kMaxChunkSize = 4u << 20;
constexpr uint32_t kDefaultChunkSize = 64 * 1024;
inline bool ValidChunkSize(uint64_t c) {
  return c >= kMinChunkSize && c <= kMaxChunkSize && (c & (c - 1)) == 0;
}

// --- Pack files ----------------------------------------------------------------
//   [ PackHeader, padded to 4 KiB ]
//   [ object 0 ][ object 1 ] ...      objects back to back, each a multiple of 4 KiB
//   [ PackEntry x count ]             the trailer: what the pack holds
//   [ PackFooter ]                    fixed size, at the very end of the file
// A pack is written once, sealed (trailer + footer + fdatasync) and renamed
// into place; it is never modified afterwards, only deleted whole by GC.
enum class ObjectKind : uint8_t { kChunk = 1, kPage = 2 };

constexpr uint32_t kPackVersion = 1;
constexpr uint32_t kPackHeaderBytes = 4096;
constexpr char kPackMagic[8] = {'R', 'P', 'T', 'P', 'A', 'C', 'K', '1'};
constexpr char kPackEndMagic[8] = {'R', 'P', 'T', 'P', 'K', 'E', 'N', 'D'};

struct PackHeader {
  char magic[8];
  uint32_t version;
  uint32_t header_bytes;  // kPackHeaderBytes: where the first object starts
  uint64_t pack_id;
  int64_t created_ns;  // CLOCK_REALTIME
};
static_assert(sizeof(PackHeader) == 32);

struct PackEntry {
  Digest digest;
  uint64_t offset;  // from the start of the file
  uint32_t length;  // bytes stored (a padded chunk, or kPageBytes)
  uint8_t kind;     // ObjectKind
  uint8_t reserved[3];
};
static_assert(sizeof(PackEntry) == 48);

struct PackFooter {
  char magic[8];
  uint32_t version;
  uint32_t count;           // PackEntry records in the trailer
  uint64_t trailer_offset;  // where the first PackEntry starts
  Digest trailer_digest;    // SHA-256 of the count * 48 trailer bytes
  uint64_t pack_id;
};
static_assert(sizeof(PackFooter) == 64);

}  // namespace rpoint::store
