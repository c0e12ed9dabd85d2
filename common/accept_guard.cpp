#include "common/accept_guard.h"

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace rpoint {
namespace {
constexpr std::chrono::seconds kLogEvery{10};
}  // namespace

AcceptGuard::AcceptGuard(std::string what) : what_(std::move(what)) {
  reopen_reserve();
}

bool AcceptGuard::IsExhaustion(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

void AcceptGuard::reopen_reserve() {
  if (!reserve_) reserve_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
}

std::chrono::milliseconds AcceptGuard::on_exhausted(int listen_fd, int err) {
  ++failures_;
  auto now = std::chrono::steady_clock::now();
  if (!exhausted_ || now - last_log_ >= kLogEvery) {
    spdlog::error(
        "{}: accept: {} ({} time(s) since the last report, {} client(s) refused so far);"
        " refusing new clients until descriptors are freed",
        what_, std::strerror(err), failures_, shed_);
    last_log_ = now;
    failures_ = 0;
  }
  exhausted_ = true;
  // Shed one waiting client with the reserve descriptor, so it is told at
  // once rather than left hanging in the backlog. Only if one is waiting:
  // the listener may be a blocking socket.
  pollfd p{listen_fd, POLLIN, 0};
  if (reserve_ && ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
    reserve_.reset();
    int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c >= 0) {
      ::close(c);
      ++shed_;
    }
  }
  reopen_reserve();  // may fail while exhausted: tried again next time
  return kBackoff;
}

void AcceptGuard::on_accepted() {
  if (!exhausted_) return;
  exhausted_ = false;
  reopen_reserve();
  spdlog::warn(
      "{}: accepting again ({} failed accept(s) since the last report, {} client(s) "
      "refused while out of descriptors)",
      what_, failures_, shed_);
  failures_ = 0;
}

}  // namespace rpoint
