// ChangeTracker: crash-safe record of which blocks of a disk changed since its
// last restore point.
//
// QEMU's persistent dirty bitmaps are declared inconsistent after an unclean
// stop and force a full backup. Here, as in Linux md's write-intent bitmap,
// the rule is a two-level one: a block's dirty bit may be set in memory and
// written behind, as long as a coarse *intent* bit covering it is durable
// before the data write is issued. Each generation has a coarse map (one bit
// per region of 1/256 of the disk, at least 1 MiB; in the file's header page)
// next to its fine map (one bit per `granularity` block). Only the first
// write into a coarse region in a generation pays a header write + fdatasync
// (at most 256 per generation, group-committed by the flusher thread for
// every write waiting at the time: a random writer pays a handful); every other first
// write to a block sets its fine bit in memory, on the reactor thread, and
// goes on. A generation's fine bits reach the file when it is frozen (the
// flusher writes them, fdatasyncs, then clears the header's kFineIncomplete
// flag and fdatasyncs again) and at a clean shutdown. Opening a generation
// whose flag is still set (kill -9, power loss) widens it: every fine bit of
// every region its coarse map holds is set. After any crash the bitmap can
// only over-report (whole regions of the generation's coarse map, which the
// next incremental point rereads and the content-addressed store dedups),
// never miss a change. Regions are a disk fraction rather than a fixed size
// so that the sync count per generation stays bounded on a 1 TiB disk too;
// the price is a coarser over-report there after a crash.
//
// Why not a durable fine bit per first write (this tracker until session 6,
// Ceph's object map, dm-era): a random 4 KiB writer touches every block of
// the disk right after each cut, so nearly every write waited for an
// fdatasync (0.27x of idle IOPS). Why not only in-memory bits plus a periodic
// flush: a crash between flushes would miss changes. The coarse map bounds the
// syncs per generation by the region count and keeps the over-report bounded.
//
// Generations: the active generation collects new changes in its own file. A
// restore point cut freezes it and a fresh generation becomes active, in
// three steps (engine/cut.h): arm() makes the next generation's file and arms
// the flip on the cut's CutSwitch; the switch's publish() is the flip (one
// store shared by all of a VM's disks, no lock, no I/O, no gate); settle()
// then files the frozen generation away, and write_behind() (once every disk
// of the cut settled) wakes the flusher to write its fine bits. flip() does it
// all for one disk.
// Frozen generations stay on disk until the restore point that copied them has
// succeeded (retire_through()); a failed point keeps them, so the next point
// still sees every change. changed() is the union of all frozen generations:
// the copier's work list.
//
// Several consumers (restore point collections of one VM) may each have
// captured the disk up to a different generation: changed(after) is the union
// of the frozen generations newer than `after`, the changes one consumer has
// not captured yet. The caller retires only through the oldest generation any
// consumer still needs. id() tells a consumer's recorded generation number
// apart from one of a later tracker of a disk recreated under the same name:
// a random number made with the directory, kept in <dir>/id.
//
// The epoch (== the number of the generation that takes new marks) is one
// atomic word (epoch, armed bit); only while a cut is armed does a reader also
// load the Arm (an atomic shared_ptr) and its switch. Never a mutex.
//
// Visibility (what orders a new-epoch write against the frozen generation) and
// durability (what survives a crash) are kept apart. Visibility: a frozen
// generation gains no bit once any bit of the next one is visible, so a write
// of the new epoch that finds its blocks marked (or waited for their marks)
// sees the frozen generations, i.e. the point's copy set, in their final state
// before it decides whether to preserve a block (docs/restore-points.md, *The
// cut*). Three rules keep that true with marks set on reactor threads:
//  - the fast path (a reactor sets fine bits itself) runs only while no cut is
//    armed, in the generation of the unarmed epoch it read, and announces
//    itself in marking_[epoch % 2] around the check and the set; arm() sets
//    the armed bit, then waits (spinning: a set is a few atomic ORs) until no
//    fast mark of the old epoch is in progress. Armed or published, marks go
//    to the flusher;
//  - the flusher puts a batch into the generation of the epoch current when
//    it takes the batch (published switch included) and runs batches one
//    after the other, so a batch for the next generation runs after every
//    batch for the frozen one;
//  - once settled, the fast path into the new generation stays off while the
//    flusher is still in a batch for an older one (batch_gen_), so settle()
//    never waits for the flusher.
// Durability: a fine bit is visible (in memory) only once its coarse region
// is durable; the fine bits themselves become durable at freeze or shutdown.
//
// Writes in flight across a flip hold an epoch ticket (enter/leave). A mutation
// that completes in a later epoch than it entered re-marks its blocks in the new
// generation before it is acknowledged (a failed one too: part of it may have
// landed), and retire_through(g) waits until every
// mutation that entered in an epoch <= g has left, so a frozen generation is
// never deleted while a write it covers could still land unrecorded. The wait
// sleeps on a condition variable the last leave() of an epoch signals; callers
// that hold a lock others need wait first with wait_writes_left(), unlocked.
//
// Files: <dir>/<generation:016x>.ctbm, a 4 KiB header page (magic RPCTBM02,
// granularity, flags, generation, coarse shift, header CRC-32C, fine-map page
// count and CRC-32C, then the coarse map from byte 64) followed by the fine
// bitmap pages at their page offsets. A header that fails its checksum drops
// the history (forget_history: the next point of the disk is full); a complete
// generation whose fine map fails its own is widened as after a crash (its
// fine bits are all inside its coarse map). Headers without the checksum flag
// (older daemons) load unchecked. RPCTBM01 files
// (older daemons: every fine bit durable before its write) load as complete. Each file is
// fully allocated when its generation is prepared (before a cut is published) or the
// disk grows, so marking on the data path never needs a new block: a full state
// filesystem fails a cut or a resize, never a guest write.
//
// Files lost while running (an operator's rm -rf of the directory, a file
// deleted, truncated or replaced, the state filesystem unmounted): the
// in-memory bits stay whole (the data path only writes through open fds), but
// a restart would read a history with holes, and a vanished directory would
// fail every cut. find_damage() tells (the directory and every live
// generation file still the inode the tracker holds, none shorter than
// allocated, the id file there). Each cut checks first (prepare_next): a
// damaged tracker drops its history as forget_history() does at Open (the
// directory made anew, a new id, no retirement, the old generations detached
// from their files), so that cut's point is full and succeeds. Between cuts
// the flusher checks every kFileCheckInterval (and a clean stop once more)
// and, on damage inside the directory, removes the id and retired files (no
// in-memory change, which a cut in progress could see half done): a crash or
// stop before the next cut then restarts as a new tracker, never from the
// holes (a directory gone restarts as one anyway; one replaced may be a new
// disk's of the same name, so it is left alone). A kill -9 within that
// interval of the damage is caught by Open: <dir>/live records the number and
// inode of every generation held (record_live: at Open and when a cut
// prepares the next one), and a recorded generation not retired but missing,
// or another inode at its path, drops the history as an unreadable file does.
// Left uncovered: the live file deleted too within that interval (or none,
// from an older daemon).
//
// Thread-safety: ensure_marked/enter/leave/epoch/covered from any reactor
// thread; flip/changed/retire_through/grow from control-plane threads. The
// data path takes the tracker mutex only on the slow path (first write into a
// coarse region, or any first write to a block while a cut is armed).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "engine/cut_switch.h"
#include "engine/reactor.h"
#include "engine/sparse_bitmap.h"

namespace rpoint {

struct ChangeTrackerOptions {
  std::string dir;                   // this disk's own directory of generation files
  uint32_t granularity = 64 * 1024;  // bytes per bit: a power of two >= 4096
  uint64_t disk_size = 0;
};

class ChangeTracker {
 public:
  // Bits of a generation's coarse map (the header page from byte 64 on).
  static constexpr uint64_t kCoarseWords = (4096 - 64) / 8;
  static constexpr uint64_t kCoarseBits = kCoarseWords * 64;

  static Result<std::unique_ptr<ChangeTracker>> Open(const ChangeTrackerOptions& options);
  ~ChangeTracker();
  ChangeTracker(const ChangeTracker&) = delete;
  ChangeTracker& operator=(const ChangeTracker&) = delete;

  uint32_t granularity() const { return granularity_; }
  uint64_t block_of(uint64_t offset) const { return offset >> shift_; }

  // ---- data path ----
  // Epoch ticket of a mutation: enter() before deciding how to issue it,
  // leave() once it completed and (if the epoch moved) was re-marked.
  uint64_t enter();
  void leave(uint64_t epoch);
  uint64_t epoch() const { return view().epoch; }

  // True when [offset, offset+length) is marked in the active generation (its
  // fine bits visible, its coarse regions durable), found so or marked now on
  // the calling thread: the write may be issued at once. Otherwise `done` is
  // posted to `reactor` once the flusher marked it (or with an error; then the
  // write must fail, never be issued untracked).
  bool ensure_marked(uint64_t offset, uint64_t length, Reactor& reactor,
                     std::function<void(Status)> done);

  // ---- control path ----
  // A cut in three steps (engine/cut.h). arm(): makes the next generation's
  // file if prepare_next() did not, and arms the flip on `sw`; until sw is
  // published nothing changes for writes. Returns the generation the flip
  // freezes and the bitmaps a snapshot of it tests (frozen_bitmaps(after) plus
  // the active one, which publishing freezes). Conflict when already armed or
  // writes of the epoch four back are still in flight. history_gap: empty
  // when the history after `after` is whole (this tracker froze generation
  // `after` and still holds every generation since: none was retired past
  // it); else why not, and `bitmaps` lack changes, so the point must be full.
  // A gap means the caller's base is older than what the tracker retired: a
  // metadata.db put back from a copy, or its -wal lost in a crash. after == 0
  // (no particular base: what the kept generations hold) is always whole.
  struct Armed {
    uint64_t frozen = 0;
    std::vector<std::shared_ptr<const SparseBitmap>> bitmaps;
    std::string history_gap;
  };
  Result<Armed> arm(std::shared_ptr<const CutSwitch> sw, uint64_t after = 0);
  // After sw was published: the frozen generation joins the frozen ones, the
  // next one becomes active. No I/O, cannot fail, wakes no thread (a woken
  // flusher could take the CPU from the cutting thread while the VM's other
  // disks wait to settle). Returns the frozen number.
  uint64_t settle();
  // After every disk of the cut settled: wakes the flusher to write the
  // frozen generation's fine bits behind (until then its header flag stays
  // set, so a crash widens it: as safe, only later complete).
  void write_behind();
  // A cut that failed before publishing: back to unarmed (the prepared next
  // generation is kept for the next try).
  void disarm();
  // arm + publish + settle on a switch of its own (one disk; tests).
  Result<uint64_t> flip();
  Status prepare_next();
  // Union of every frozen generation still kept: blocks changed since the last
  // retired restore point (up to the last flip). all_since_creation() is true
  // when no restore point was ever retired (the caller copies everything).
  // after > 0: only the frozen generations numbered above `after` (what a
  // consumer that captured through generation `after` still lacks).
  SparseBitmap changed(uint64_t after = 0) const;
  // The frozen generations' bitmaps themselves (cheap: no merge), for testing
  // membership block by block on the data path; `after` as for changed().
  std::vector<std::shared_ptr<const SparseBitmap>> frozen_bitmaps(uint64_t after = 0) const;
  // Blocks changed after generation `after` (what a point that captured
  // through it lacks), live: the frozen generations numbered above it and the
  // active one (a mark is visible before its write is issued, so every write
  // issued so far is in). False, with *out untouched, when some generation
  // after `after` was retired already (that history is gone) or `after` is
  // not a generation this tracker froze. out null: only whether it could.
  bool changed_since(uint64_t after, SparseBitmap* out) const;
  // Numbers of the frozen generations still kept, oldest first (tests, logs).
  std::vector<uint64_t> frozen_generations() const;
  bool all_since_creation() const;
  // This tracker's identity (never 0): differs between the trackers of two
  // disks ever made under one name, so a generation number recorded against
  // one is never taken for one of the other.
  uint64_t id() const { return id_.load(); }
  // A restore point covering generations <= gen succeeded: waits for mutations
  // of those epochs to leave, then deletes their files.
  Status retire_through(uint64_t gen);
  // Waits (sleeping) until every mutation that entered in an epoch <= gen has
  // left; false if some are still in flight after `timeout`. Once true, no
  // such mutation can start again (the epoch has moved on): retire_through(gen)
  // does not wait.
  bool wait_writes_left(uint64_t gen, std::chrono::milliseconds timeout);
  // Threads inside wait_writes_left / retire_through's wait (tests).
  int waiting_for_writes() const { return retire_waiters_.load(); }
  // The disk grew: new blocks are tracked from now on.
  Status grow(uint64_t new_disk_size);
  // Waits until every queued mark was made (its coarse region durable, its
  // fine bits visible) and every frozen generation's fine bits are on disk
  // (tests).
  Status sync();

  // Observability.
  size_t memory_bytes() const;
  uint64_t marks_written() const { return marks_written_.load(); }
  uint64_t syncs() const { return syncs_.load(); }          // coarse-map (intent) fdatasyncs
  uint64_t finalized() const { return finalized_.load(); }  // generations made complete

 private:
  struct Generation {
    uint64_t number = 0;
    UniqueFd fd;
    SparseBitmap bits;  // fine: visible marks (durable up to the coarse map)
    std::string path;
    unsigned coarse_shift = 0;  // log2 of fine blocks per coarse region
    // Durable coarse regions (set only after their header write's fdatasync).
    // Regions past kCoarseBits count as set once kFineIncomplete is durable
    // (an unclean open widens everything past the map).
    std::array<std::atomic<uint64_t>, kCoarseWords> coarse{};
    // kFineIncomplete durable. Written by the flusher/owner; read by the fast path.
    std::atomic<bool> incomplete_on_disk{false};
    // Bytes the file is known to hold (allocated when made or grown, or as
    // found at Open); shorter means it was truncated behind our back. 0: not
    // checked (RPCTBM01 files are sparse).
    std::atomic<uint64_t> min_size{0};
    // The history was dropped (forget_history) since it was made: its file
    // no longer counts, and find_damage() skips it.
    std::atomic<bool> detached{false};
    bool coarse_covers(uint64_t first, uint64_t last) const;
    std::array<uint64_t, kCoarseWords> coarse_words() const;  // a copy of `coarse`
  };
  struct Arm {  // immutable; the generations the armed flip is between
    std::shared_ptr<const CutSwitch> sw;
    std::shared_ptr<Generation> active, next;
  };
  // The generation marks go to now, with no lock: the active one, or the
  // armed next one once its switch is published. `epoch` is its number.
  struct View {
    uint64_t epoch;
    Generation* gen;
  };
  View view() const;
  std::shared_ptr<Generation> current_locked() const;  // mu_ held: as view().gen
  struct Pending {
    uint64_t first, last;
    Reactor* reactor;
    std::function<void(Status)> done;
  };

  explicit ChangeTracker(const ChangeTrackerOptions& options);
  Result<std::shared_ptr<Generation>> create_generation(uint64_t number);
  Status load_existing();
  Status load_or_make_id();
  Status make_id();  // a fresh random id, durable in <dir>/id
  // An unreadable or lost generation file: start over as a new tracker (see
  // the .cpp). At Open, or with reset_mu_ held.
  Status forget_history(const std::string& why);
  // Why the files on disk no longer hold this tracker's history, or "" (see
  // the header); *dir_lost: the directory itself is gone or another one.
  // reset_mu_ held.
  std::string find_damage(bool* dir_lost) const;
  // Writes <dir>/live: the number and inode of every generation held (frozen,
  // active, prepared next), so that Open tells a file deleted or replaced
  // while the last run went on (then a kill -9 before any check) from one
  // retired. At Open (once the active generation is made) and by
  // prepare_next (once the next one is), reset_mu_ held.
  Status record_live();
  // <dir>/<name> replaced by `text` durably (common/file_io.h
  // WriteFileAtomic: a temporary file written and fdatasync'ed, renamed over
  // it, the directory fsync'ed; never torn, never empty after a power cut).
  // The id file, the retired marker, <dir>/live.
  Status replace_file(const char* name, const std::string& text);
  // The flusher's (and a clean stop's) check: on damage, only the id and
  // retired files go, so a restart is a new tracker.
  void watch_files();
  // Why the history after generation `after` is not whole (see Armed), or "".
  // mu_ held.
  std::string history_gap_locked(uint64_t after) const;
  Status write_marks(Generation& gen, const std::vector<Pending>& batch);
  // The header page (checksummed); a complete one carries the CRC of the
  // first fine_pages fine pages.
  Status write_header(Generation& gen, const std::array<uint64_t, kCoarseWords>& coarse,
                      bool incomplete, uint64_t fine_pages = 0, uint32_t fine_crc = 0);
  // The generation takes no more marks: its fine bits to disk, then the flag.
  Status finalize(Generation& gen);
  // The reactor's own mark (see the header): false when it must queue.
  bool mark_fast(uint64_t first, uint64_t last);
  void flusher_loop();

  std::string dir_;
  uint32_t granularity_;
  unsigned shift_;
  std::atomic<uint64_t> nblocks_;
  UniqueFd dir_fd_;  // replaced only by forget_history; used at Open or with reset_mu_ held
  // Serializes what touches the directory's entries after Open: the cut's
  // check and next generation (prepare_next), retirement's unlinks, the
  // flusher's check. Taken before mu_.
  mutable std::mutex reset_mu_;
  bool damage_reported_ = false;   // guarded by reset_mu_: watch_files logs once
  uint64_t recorded_through_ = 0;  // guarded by reset_mu_: highest generation in <dir>/live

  mutable std::mutex mu_;
  std::shared_ptr<Generation> active_;  // guarded by mu_
  // The active generation for the lock-free fast path. A reader holds an epoch
  // ticket while it uses it, and generations are only freed by retire_through()
  // after every ticket of their epoch has left. Generation number == epoch.
  std::atomic<Generation*> active_raw_{nullptr};
  std::shared_ptr<Generation> next_;  // pre-created, empty
  // (settled epoch << 1) | armed. Changes only under mu_: arm sets the bit,
  // settle moves to the next epoch unarmed, disarm clears the bit.
  std::atomic<uint64_t> state_{0};
  std::atomic<std::shared_ptr<const Arm>> arm_;  // while armed
  std::shared_ptr<const Arm> armed_;             // guarded by mu_
  std::vector<std::shared_ptr<Generation>> frozen_;
  bool ever_retired_ = false;
  uint64_t retired_through_ = 0;  // highest generation retire_through() was given
  std::atomic<uint64_t> id_{0};
  // In-flight mutations per epoch, indexed by epoch % 4. Cuts are seconds apart
  // and mutations finish in milliseconds, so four slots never alias in practice;
  // flip() refuses if the slot it is about to reuse is still busy.
  std::array<std::atomic<int64_t>, 4> inflight_{};
  // Retirement waits: leave() signals retire_cv_ when an epoch empties and
  // someone waits (retire_waiters_ > 0), so the data path never takes
  // retire_mu_ otherwise.
  bool writes_left(uint64_t gen) const;
  std::mutex retire_mu_;
  std::condition_variable retire_cv_;
  std::atomic<int> retire_waiters_{0};

  // Fast marks in progress, by epoch % 2 (arm() waits for its epoch's to end).
  std::array<std::atomic<int64_t>, 2> marking_{};
  // The generation of the flusher's batch in progress, 0 when none.
  std::atomic<uint64_t> batch_gen_{0};
  unsigned coarse_shift_for_new_ = 0;  // guarded by mu_: for generations made from now on
  std::deque<std::shared_ptr<Generation>> to_finalize_;  // guarded by mu_
  // The flusher writes frozen generations behind up to this number (guarded
  // by mu_): moved by write_behind(), and at Open past the crashed ones.
  uint64_t behind_through_ = 0;

  std::deque<Pending> queue_;  // guarded by mu_
  bool stopping_ = false;
  std::condition_variable cv_;
  std::condition_variable synced_cv_;
  uint64_t batches_started_ = 0, batches_done_ = 0;  // guarded by mu_
  std::thread flusher_;
  std::atomic<uint64_t> marks_written_{0}, syncs_{0}, finalized_{0};
};

}  // namespace rpoint
