// AcceptGuard: keeps a listener accepting through descriptor exhaustion.
//
// When accept() fails for want of resources (EMFILE, ENFILE, ENOBUFS,
// ENOMEM), the listening socket stays readable: a loop that retries at once
// spins, one that gives up never serves again, and the client waits in the
// backlog with no answer. The guard holds one reserve descriptor; on
// exhaustion it closes it, accepts one pending client and closes that
// connection at once (the client sees its connection closed instead of
// hanging), and reopens the reserve. It logs the first failure and then at
// most once per 10 s with a count, logs the recovery once, and tells the
// caller how long to back off before accepting again. The listener itself is
// never closed.
//
// Thread-safety: one guard per accepting thread (not shared).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "common/unique_fd.h"

namespace rpoint {

class AcceptGuard {
 public:
  static constexpr std::chrono::milliseconds kBackoff{50};

  explicit AcceptGuard(std::string what);  // `what` names the listener in the log

  // errno values that mean "out of resources, retry later".
  static bool IsExhaustion(int err);

  // accept(listen_fd) failed with exhaustion error `err`: sheds one pending
  // client (if any), logs (rate-limited). Returns the back-off to wait.
  std::chrono::milliseconds on_exhausted(int listen_fd, int err);
  // accept() succeeded: logs the recovery once after exhaustion.
  void on_accepted();

  uint64_t shed() const { return shed_; }

 private:
  void reopen_reserve();

  std::string what_;
  UniqueFd reserve_;
  bool exhausted_ = false;
  uint64_t failures_ = 0;  // since the last log line
  uint64_t shed_ = 0;
  std::chrono::steady_clock::time_point last_log_{};
};

}  // namespace rpoint
