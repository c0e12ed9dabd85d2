// RunHook: runs a FileSystemConsistent freeze/thaw command (/bin/sh -c) with a
// timeout, for restore point jobs.
//
// The command runs in its own process group with stdin from /dev/null and
// stdout+stderr captured (the last few KiB are kept for the error message).
// On timeout the whole group gets SIGKILL, so a hung `virsh` or guest agent
// cannot hold a restore point job forever. posix_spawn, not fork: the daemon
// is multi-threaded.
//
// Thread-safety: safe from any thread (no shared state).
#pragma once

#include <map>
#include <string>

#include "common/status.h"

namespace rpoint {

struct HookResult {
  bool ran = false;  // the shell started
  bool timed_out = false;
  int exit_status = -1;     // exit code, or 128 + signal
  std::string output_tail;  // last bytes of stdout+stderr
};

// env: extra variables (on top of the daemon's environment).
HookResult RunHook(const std::string& command, const std::map<std::string, std::string>& env,
                   unsigned timeout_seconds);

// "freeze hook 'cmd' exited with status 3: <tail>" style text for errors.
std::string DescribeHookFailure(const std::string& phase, const std::string& command,
                                const HookResult& r);

}  // namespace rpoint
