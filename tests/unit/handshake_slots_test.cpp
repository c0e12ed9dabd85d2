// HandshakeSlots (common/handshake_slots.h): the admission policy the NBD
// server and the peer API share, on real socket pairs (an eviction is a real
// shutdown: the client end reads EOF).
#include "common/handshake_slots.h"

#include <doctest/doctest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"

using namespace rpoint;

namespace {

struct Pair {
  UniqueFd server, client;
};

Pair MakePair() {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

// The server end was shut down: the client reads EOF at once.
bool ShutDown(const Pair& p) {
  pollfd pfd{p.client.get(), POLLIN, 0};
  if (::poll(&pfd, 1, 0) != 1) return false;
  char c;
  return ::read(p.client.get(), &c, 1) == 0;
}

}  // namespace

TEST_CASE("handshake slots: at the cap the oldest handshake is evicted, in accept order") {
  HandshakeSlots slots(3);
  std::vector<Pair> pairs;
  std::vector<std::shared_ptr<HandshakeSlots::Slot>> held;
  for (int i = 0; i < 3; ++i) {
    pairs.push_back(MakePair());
    auto a = slots.admit(pairs.back().server.get(), "c" + std::to_string(i));
    REQUIRE(a.slot);
    CHECK(a.live == size_t(i));
    CHECK_FALSE(a.evicted);
    held.push_back(a.slot);
  }
  for (const Pair& p : pairs) CHECK_FALSE(ShutDown(p));

  pairs.push_back(MakePair());
  auto a = slots.admit(pairs.back().server.get(), "c3");
  REQUIRE(a.slot);
  CHECK(a.live == 3);
  REQUIRE(a.evicted);
  CHECK(*a.evicted == "c0");
  CHECK(ShutDown(pairs[0]));
  CHECK_FALSE(ShutDown(pairs[1]));
  held.push_back(a.slot);
  // The evicted thread learns it when it ends its handshake.
  CHECK(slots.end_handshake(*held[0]));
  CHECK_FALSE(slots.end_handshake(*held[1]));

  // c1 ended its handshake: never evicted; the next oldest (c2) goes.
  pairs.push_back(MakePair());
  a = slots.admit(pairs.back().server.get(), "c4");
  REQUIRE(a.slot);
  REQUIRE(a.evicted);
  CHECK(*a.evicted == "c2");
  CHECK_FALSE(ShutDown(pairs[1]));
  CHECK(ShutDown(pairs[2]));
}

TEST_CASE("handshake slots: nothing to evict refuses; exited slots free their place") {
  HandshakeSlots slots(2);
  std::vector<Pair> pairs;
  std::vector<std::shared_ptr<HandshakeSlots::Slot>> held;
  for (int i = 0; i < 2; ++i) {
    pairs.push_back(MakePair());
    auto a = slots.admit(pairs.back().server.get(), "c" + std::to_string(i));
    REQUIRE(a.slot);
    CHECK_FALSE(slots.end_handshake(*a.slot));  // both authenticated
    held.push_back(a.slot);
  }
  Pair extra = MakePair();
  auto a = slots.admit(extra.server.get(), "x");
  CHECK_FALSE(a.slot);
  CHECK(a.live == 2);
  CHECK_FALSE(a.evicted);
  for (const Pair& p : pairs) CHECK_FALSE(ShutDown(p));

  slots.exit(*held[0]);
  CHECK(held[0]->exited());
  CHECK(slots.threads() == 1);
  a = slots.admit(extra.server.get(), "x");
  REQUIRE(a.slot);
  CHECK(a.live == 1);
  CHECK_FALSE(a.evicted);
}

TEST_CASE("handshake slots: evicted threads still exiting count up to the cap again") {
  HandshakeSlots slots(2);
  std::vector<Pair> pairs;
  std::vector<std::shared_ptr<HandshakeSlots::Slot>> held;
  // 2 live + 2 evicted but not exited = 2 x cap threads.
  for (int i = 0; i < 4; ++i) {
    pairs.push_back(MakePair());
    auto a = slots.admit(pairs.back().server.get(), "c" + std::to_string(i));
    REQUIRE(a.slot);
    CHECK(a.threads == size_t(i));
    CHECK(a.evicted.has_value() == (i >= 2));
    held.push_back(a.slot);
  }
  CHECK(ShutDown(pairs[0]));
  CHECK(ShutDown(pairs[1]));
  Pair extra = MakePair();
  auto a = slots.admit(extra.server.get(), "x");
  CHECK_FALSE(a.slot);
  CHECK(a.threads == 4);
  CHECK_FALSE(ShutDown(pairs[2]));  // refused without evicting anyone
  CHECK_FALSE(ShutDown(pairs[3]));

  // One evicted thread exits: room for one more, again by eviction.
  slots.exit(*held[0]);
  a = slots.admit(extra.server.get(), "x");
  REQUIRE(a.slot);
  REQUIRE(a.evicted);
  CHECK(*a.evicted == "c2");
}

TEST_CASE("handshake slots: expire cuts handshakes accepted before the deadline") {
  HandshakeSlots slots(8);
  Pair old_pair = MakePair(), done_pair = MakePair();
  auto old_slot = slots.admit(old_pair.server.get(), "old").slot;
  auto done_slot = slots.admit(done_pair.server.get(), "done").slot;
  REQUIRE(old_slot);
  REQUIRE(done_slot);
  CHECK_FALSE(slots.end_handshake(*done_slot));
  auto cutoff = HandshakeSlots::Clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  Pair young_pair = MakePair();
  auto young_slot = slots.admit(young_pair.server.get(), "young").slot;
  REQUIRE(young_slot);
  REQUIRE(young_slot->accepted() > cutoff);
  CHECK(slots.expire(cutoff) == std::vector<std::string>{"old"});
  CHECK_FALSE(ShutDown(young_pair));
  CHECK(ShutDown(old_pair));
  CHECK_FALSE(ShutDown(done_pair));
  CHECK(slots.expire(HandshakeSlots::Clock::now()) == std::vector<std::string>{"young"});
  CHECK(ShutDown(young_pair));
  CHECK(slots.end_handshake(*old_slot));
}

TEST_CASE("handshake slots: the eviction callback runs before the socket is shut down") {
  HandshakeSlots slots(1);
  Pair first = MakePair(), second = MakePair();
  auto a = slots.admit(first.server.get(), "old");
  REQUIRE(a.slot);
  std::vector<std::string> seen;
  bool open_in_callback = false;
  auto b = slots.admit(second.server.get(), "new", [&](const std::string& label) {
    seen.push_back(label);
    open_in_callback = !ShutDown(first);  // a client could not have seen the close yet
  });
  REQUIRE(b.slot);
  CHECK(seen == std::vector<std::string>{"old"});
  CHECK(open_in_callback);
  CHECK(ShutDown(first));
  // The deadline path too.
  seen.clear();
  open_in_callback = false;
  auto gone = slots.expire(HandshakeSlots::Clock::now(), [&](const std::string& label) {
    seen.push_back(label);
    open_in_callback = !ShutDown(second);
  });
  CHECK(gone == std::vector<std::string>{"new"});
  CHECK(seen == gone);
  CHECK(open_in_callback);
  CHECK(ShutDown(second));
  slots.exit(*a.slot);
  slots.exit(*b.slot);
}
