// Flags: rpointd's command line (Boost.Program_options).
//
// Parsing only: no file is read and nothing is started here, so a bad flag is
// reported before the daemon touches anything.
// Thread-safety: plain values and a pure function.
#pragma once

#include <optional>
#include <string>

#include "common/status.h"

namespace rpoint {

struct Flags {
  std::optional<std::string> config_path;  // --config FILE
  std::optional<std::string> state_dir;    // --state-dir DIR (overrides the config)
  std::optional<std::string> log_level;    // --log-level LEVEL (overrides the config)
  bool check_config = false;               // validate, print the effective config, exit
  bool help = false;
  bool version = false;
};

// argv[0] is skipped. InvalidArgument with a one-line message on a bad flag.
Result<Flags> ParseFlags(int argc, const char* const* argv);
// The --help text.
std::string FlagsHelp();

}  // namespace rpoint
