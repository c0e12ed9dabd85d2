// Disk sizes on the command line: parsing "10G" and printing "10 GiB".
//
// Units are binary, as in qemu-img and most disk tools: K/KiB = 1024, M/MiB =
// 1024^2, G, T, P likewise; a bare number or a B suffix is bytes. "GB" and
// friends are refused rather than guessed (decimal or binary?).
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace rpoint::cli {

Result<uint64_t> ParseSize(const std::string& text);

// "10 GiB", "1.5 GiB" (two significant decimals at most), "512 B".
std::string FormatSize(uint64_t bytes);

}  // namespace rpoint::cli
