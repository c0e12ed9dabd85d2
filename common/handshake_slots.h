// HandshakeSlots: who may connect to a listener whose connections negotiate
// (an NBD handshake, a TLS handshake) on a thread of their own.
//
// A client that connects and stays silent holds its thread until its
// deadline; enough of them would lock real clients out. The policy, shared by
// the NBD server (nbd/server.cpp, cap 512) and the peer API
// (control/peer_server.cpp, cap 64):
//   - a connection counts against the cap from admit() until its thread
//     exits (exit()), unless it was evicted;
//   - at the cap, the oldest connection still in its handshake (accept order)
//     is evicted: its socket is shut down, which wakes the thread's poll and
//     makes it give up. One whose handshake is over is never evicted;
//   - evicted threads still exiting count up to the cap again: with 2 x cap
//     threads not yet exited, or nothing left to evict, a new connection is
//     refused (the caller closes it).
// The thread calls end_handshake() once it is done negotiating (success or
// not) and before its socket may be closed: from then on the socket is the
// thread's alone. A true answer means it was evicted meanwhile: drop it.
//
// Thread-safety: all members are safe to call from any thread (one internal
// mutex). A Slot is used by its connection's thread (end_handshake, exit) and
// the acceptor; the HandshakeSlots must outlive every thread holding a Slot.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace rpoint {

class HandshakeSlots {
 public:
  using Clock = std::chrono::steady_clock;

  // One admitted connection.
  class Slot {
   public:
    const std::string& label() const { return label_; }
    Clock::time_point accepted() const { return accepted_; }
    // exit() was called: the caller may join the thread.
    bool exited() const { return exited_.load(); }

   private:
    friend class HandshakeSlots;
    int fd_ = -1;
    std::string label_;
    Clock::time_point accepted_;
    bool handshaking_ = true;  // mu_
    bool evicted_ = false;     // mu_
    std::atomic<bool> exited_{false};
  };

  struct Admission {
    std::shared_ptr<Slot> slot;  // null: refused, the caller closes the socket
    size_t live = 0;             // connections counting against the cap, before this one
    size_t threads = 0;          // threads not exited (evicted ones too), before this one
    // The label of the connection evicted to make room, if one was.
    std::optional<std::string> evicted;
  };

  explicit HandshakeSlots(size_t cap) : cap_(cap) {}
  HandshakeSlots(const HandshakeSlots&) = delete;
  HandshakeSlots& operator=(const HandshakeSlots&) = delete;

  size_t cap() const { return cap_; }

  // Called with an evicted connection's label just before its socket is shut
  // down (under the internal mutex: log, do not call back in), so that a
  // client that sees the close finds the reason already logged.
  using OnEvict = std::function<void(const std::string& label)>;
  // The acceptor has a new connection on `fd` (`label` names it in logs).
  // Admits it (evicting the oldest handshake at the cap) or refuses it.
  Admission admit(int fd, std::string label, const OnEvict& on_evict = {});

  // Evicts every connection still in its handshake accepted at or before `cutoff`
  // (a deadline enforced by the acceptor); returns their labels.
  std::vector<std::string> expire(Clock::time_point cutoff, const OnEvict& on_evict = {});

  // The connection's thread ends its handshake; true if it was evicted
  // meanwhile (its socket is shut down: drop the connection).
  bool end_handshake(Slot& slot);

  // The connection's thread is about to end: the slot no longer counts.
  void exit(Slot& slot);

  // Slots not yet exited (evicted ones included).
  size_t threads();

 private:
  void prune_locked();
  static bool evict_locked(Slot& s, const OnEvict& on_evict);

  const size_t cap_;
  std::mutex mu_;
  std::list<std::shared_ptr<Slot>> slots_;  // accept order
};

}  // namespace rpoint
