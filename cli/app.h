// The rpoint command line: global options, dispatch through the command
// table, exit codes (see cli/command.h and docs/rpoint.1.md).
// Thread-safety: call from one thread.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace rpoint::cli {

// Where the CLI looks for the control socket without --socket or
// $RPOINT_SOCKET: the daemon's built-in default (<state_dir>/control.sock with
// the default state_dir, config/config.h) if that socket exists, else where
// the shipped config and systemd/rpointd.socket put it.
inline constexpr const char* kDefaultSocket = "/var/lib/rpointd/control.sock";
inline constexpr const char* kSystemdSocket = "/run/rpointd/control.sock";

// The socket to use when neither --socket nor $RPOINT_SOCKET says.
std::string DefaultSocket();

// args excludes argv[0]. Returns the process exit code.
int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace rpoint::cli
