// Crc32c: CRC-32C (Castagnoli, the iSCSI/ext4/Btrfs polynomial), for checking
// small metadata files the daemon keeps in place (change-tracking headers and
// bitmaps). Not for chunk data: the store names chunks by SHA-256.
//
// Why our own: engine/ (its first user) links no library that has one. OpenSSL
// (a dependency of store/ only) has no CRC-32C, zlib's crc32 is another
// polynomial and not a dependency, and a digest would be overkill for 4 KiB
// pages that only need bit-rot detection. x86-64 CPUs with SSE4.2 compute it
// with the crc32 instruction; others use a 256-entry table.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rpoint {

// Extends `crc` (the value returned for the bytes before; 0 to start) over
// len bytes: Crc32c(Crc32c(0, a), b) == Crc32c(0, a + b).
uint32_t Crc32c(uint32_t crc, const void* data, size_t len);
// The same by table only (tests compare it with the instruction's answer).
uint32_t Crc32cPortable(uint32_t crc, const void* data, size_t len);

}  // namespace rpoint
