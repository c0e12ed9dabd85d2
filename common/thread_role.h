// Thread roles: which threads must never block.
//
// A reactor loop thread (engine/reactor.h) serves many NBD requests at once, so
// one synchronous wait on it (SQLite, a pack or tree-page pread, a page-cache
// copy that hits dirty throttling) stalls every client on that thread.
// Reactor::run() marks its thread; the code that does such blocking work states
// it with RPOINT_ASSERT_MAY_BLOCK("what"). In builds with assertions (!NDEBUG:
// debug and the default debugoptimized) that aborts when it runs on a reactor
// thread, so the unit and integration tests prove the data path stays clean;
// release builds compile it out.
//
// Thread-safety: the flag is thread-local; each thread sets only its own.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace rpoint {

namespace internal {
inline thread_local bool t_reactor_thread = false;
}  // namespace internal

// Marks (or unmarks) the calling thread as a reactor loop thread.
inline void SetReactorThread(bool on) {
  internal::t_reactor_thread = on;
}
inline bool OnReactorThread() {
  return internal::t_reactor_thread;
}

#ifndef NDEBUG
#define RPOINT_ASSERT_MAY_BLOCK(what)                                                            \
  do {                                                                                           \
    if (::rpoint::OnReactorThread()) {                                                           \
      std::fprintf(stderr, "rpointd: %s:%d: blocking call (%s) on a reactor thread\n", __FILE__, \
                   __LINE__, what);                                                              \
      std::abort();                                                                              \
    }                                                                                            \
  } while (0)
#else
#define RPOINT_ASSERT_MAY_BLOCK(what) \
  do {                                \
  } while (0)
#endif

}  // namespace rpoint
