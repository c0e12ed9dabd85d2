// Process-wide logging setup (spdlog). Call InitLogging once at start-up.
// Under systemd (JOURNAL_STREAM set) lines carry no timestamp (the journal adds
// its own) and a <N> syslog priority prefix the journal understands.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

#include "common/status.h"

namespace rpoint {

// level: trace, debug, info, warn, error, critical, off.
Status ParseLogLevel(const std::string& name, spdlog::level::level_enum* out);
void InitLogging(spdlog::level::level_enum level);
bool UnderJournal();

}  // namespace rpoint
