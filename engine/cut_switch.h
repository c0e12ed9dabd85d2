// CutSwitch: the one flag whose store is a restore point's cut.
//
// A cut of a VM (engine/cut.h) makes one CutSwitch and arms every included
// disk's change tracker on it (ChangeTracker::arm): each tracker prepares its
// next generation and its disk installs the snapshot, while writes go on in
// the old epoch. publish() then moves every armed disk to the new epoch at
// once: every mutation reads its disk's epoch at submission
// (ChangeTracker::enter), and an armed tracker's epoch is "old, or new once the
// switch is published". One store, no gate: a mutation never waits for a cut.
//
// seq_cst on both sides: a mutation whose submission begins after publish()
// returned (in real time, e.g. a guest write sent after the reply to a write
// on another disk that saw the new epoch) sees the new epoch, on every disk.
//
// Thread-safety: publish() from the cutting thread, published() from any.
#pragma once

#include <atomic>

namespace rpoint {

class CutSwitch {
 public:
  bool published() const { return published_.load(std::memory_order_seq_cst); }
  void publish() { published_.store(true, std::memory_order_seq_cst); }

 private:
  std::atomic<bool> published_{false};
};

}  // namespace rpoint
