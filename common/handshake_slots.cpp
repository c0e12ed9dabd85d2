#include "common/handshake_slots.h"

#include <sys/socket.h>

#include <utility>

namespace rpoint {

void HandshakeSlots::prune_locked() {
  for (auto it = slots_.begin(); it != slots_.end();) {
    it = (*it)->exited() ? slots_.erase(it) : std::next(it);
  }
}

bool HandshakeSlots::evict_locked(Slot& s, const OnEvict& on_evict) {
  if (s.exited() || s.evicted_ || !s.handshaking_) return false;
  s.evicted_ = true;
  if (on_evict) on_evict(s.label_);  // the reason first, then the close
  ::shutdown(s.fd_, SHUT_RDWR);
  return true;
}

HandshakeSlots::Admission HandshakeSlots::admit(int fd, std::string label,
                                                const OnEvict& on_evict) {
  Admission a;
  std::lock_guard<std::mutex> lock(mu_);
  prune_locked();
  a.threads = slots_.size();
  for (const auto& s : slots_) a.live += !s->exited() && !s->evicted_;
  if (a.threads >= 2 * cap_) return a;
  if (a.live >= cap_) {
    for (const auto& s : slots_) {  // oldest first
      if (evict_locked(*s, on_evict)) {
        a.evicted = s->label_;
        break;
      }
    }
    if (!a.evicted) return a;
  }
  auto slot = std::make_shared<Slot>();
  slot->fd_ = fd;
  slot->label_ = std::move(label);
  slot->accepted_ = Clock::now();
  slots_.push_back(slot);
  a.slot = std::move(slot);
  return a;
}

std::vector<std::string> HandshakeSlots::expire(Clock::time_point cutoff, const OnEvict& on_evict) {
  std::vector<std::string> out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& s : slots_) {
    if (s->accepted_ <= cutoff && evict_locked(*s, on_evict)) out.push_back(s->label_);
  }
  return out;
}

bool HandshakeSlots::end_handshake(Slot& slot) {
  std::lock_guard<std::mutex> lock(mu_);
  slot.handshaking_ = false;
  return slot.evicted_;
}

void HandshakeSlots::exit(Slot& slot) {
  std::lock_guard<std::mutex> lock(mu_);
  slot.handshaking_ = false;  // a thread that never ended its handshake: its socket goes now
  slot.exited_.store(true);
}

size_t HandshakeSlots::threads() {
  std::lock_guard<std::mutex> lock(mu_);
  prune_locked();
  return slots_.size();
}

}  // namespace rpoint
