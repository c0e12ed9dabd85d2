// BlockDevice: what every transport serves, and the only thing it knows of storage.
//
// The NBD server (and later the ublk queues) translate wire requests into
// IoRequests on a BlockDevice and map the result back to their own error
// vocabulary. Managed disks (FileDisk), read-only restore point views and any
// later backend implement this one interface, so change tracking, cuts and
// copy-before-write live once, below it, for every transport.
//
// Thread-safety: submit() is called on a Reactor's loop thread and completes on
// that same thread; several reactors may submit to one device at once.
// Metadata accessors are safe from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/reactor.h"

namespace rpoint {

// kBlockStatus: the allocation map of [offset, offset+length) into
// IoRequest::extents, as block_status() but without blocking the reactor.
enum class IoKind : uint8_t { kRead, kWrite, kFlush, kTrim, kWriteZeroes, kCache, kBlockStatus };

// One run of blocks with the same allocation state; flags as NBD base:allocation.
struct Extent {
  static constexpr uint32_t kHole = 1;  // not allocated
  static constexpr uint32_t kZero = 2;  // reads as zeroes
  uint64_t length = 0;
  uint32_t flags = 0;
};

// A metadata context beyond base:allocation (NBD "Metadata querying"), e.g.
// rpoint:changed:{collection}/{point}: maps a range of its export to extents
// whose flags are the context's own (kDirty for rpoint:changed).
// Thread-safety: extents() is safe from any thread but synchronous (tree
// walks, SQLite): never call it on a reactor thread.
class MetaContext {
 public:
  static constexpr uint32_t kDirty = 1;  // rpoint:changed: the block differs
  virtual ~MetaContext() = default;
  virtual const std::string& name() const = 0;
  // Map of [offset, offset+length): at most max_extents entries, adjacent ones
  // of equal flags merged, covering at least one byte.
  virtual Result<std::vector<Extent>> extents(uint64_t offset, uint64_t length,
                                              size_t max_extents) = 0;
};

// Request flags (a bit set).
enum IoFlags : uint32_t {
  kIoFua = 1u << 0,       // write/zero/trim durable before completion
  kIoNoHole = 1u << 1,    // write-zeroes must allocate (not punch a hole)
  kIoFastZero = 1u << 2,  // write-zeroes: fail with -ENOTSUP unless zeroing is cheap
};

class BlockDevice;

// One I/O, owned by the caller (e.g. an NBD request slot) for its whole life.
// The caller fills the public fields and overrides on_done(); the engine owns
// the rest until on_done() runs on the submitting reactor's thread with
// 0 (success) or -errno.
class IoRequest : public Reactor::Op {
 public:
  IoKind kind = IoKind::kRead;
  uint32_t flags = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  char* buf = nullptr;  // kRead/kWrite: `length` bytes; 4096-aligned enables O_DIRECT
  // kRead/kWrite, >= 0: the data is the fixed (registered) buffer of this
  // index in the submitting reactor's ring, e.g. a ublk request's own pages
  // (zero copy), and `buf` is where in it as io_uring reckons: the byte
  // offset for kernel-registered pages (a ublk request's; nullptr = its
  // first byte), the address for registered user memory. Only
  // devices whose caps() say fixed_buffers are given such requests; the data
  // is then never in user memory (the device must not memcpy or pwrite it).
  int fixed_buf = -1;
  // kBlockStatus: at most max_extents entries go to extents (covering at least
  // one byte on success; the device clears it first).
  size_t max_extents = 0;
  std::vector<Extent> extents;
  // kBlockStatus: further contexts to map (owned by the caller, who keeps them
  // alive until on_done); the device answers each into context_extents[i], or
  // fails the request. Only devices that answer contexts are ever given any.
  const std::vector<std::shared_ptr<MetaContext>>* contexts = nullptr;
  std::vector<std::vector<Extent>> context_extents;

  virtual void on_done(int result) = 0;

  // Engine-private progress state.
  BlockDevice* device_ = nullptr;
  Reactor* reactor_ = nullptr;
  uint64_t done_ = 0;
  uint32_t stage_ = 0;
  int inline_result_ = 0;  // FileDisk: result of a write done at submit time
  bool entered_ = false;  // holds a change-tracking epoch ticket
  bool buffered_ = false;  // FileDisk: O_DIRECT refused this request, the buffered fd serves it
  uint64_t epoch_ = 0;

  void complete(int res, uint32_t cqe_flags) override;

 protected:
  ~IoRequest() = default;
};

struct DeviceCaps {
  bool read_only = false;
  bool can_flush = true;
  bool can_trim = false;
  bool can_zero = false;       // WRITE_ZEROES
  bool can_fast_zero = false;  // zeroing cheaper than writing
  bool can_cache = false;
  bool can_multi_conn = true;  // a flush covers writes completed on every connection
  bool rotational = false;
  // Takes IoRequest::fixed_buf (registered buffers of the reactor's ring).
  bool fixed_buffers = false;
  uint32_t min_block = 1;        // smallest request granularity clients must honour
  uint32_t preferred_block = 4096;
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual const std::string& name() const = 0;
  virtual uint64_t size() const = 0;
  virtual DeviceCaps caps() const = 0;

  // Starts `req` on `reactor`; req.on_done() runs later on the same thread,
  // never from inside submit(). Requests are range-checked here as well
  // (-EINVAL out of range, -EPERM writes to a read-only device), but callers
  // check first with check_range() so they can give a precise wire error.
  virtual void submit(Reactor& reactor, IoRequest& req) = 0;

  // Allocation map of [offset, offset+length), at most max_extents entries,
  // covering at least one byte. Synchronous (lseek on a file, the tree of a
  // restore point): never on a reactor thread, which submits kBlockStatus.
  virtual Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length,
                                                   size_t max_extents) = 0;

  // Ok, or OutOfRange when [offset, offset+length) is not inside the device.
  Status check_range(uint64_t offset, uint64_t length) const;

  // Users: a transport holds a Use for as long as a client is attached, so the
  // control plane can refuse to delete a device in use.
  class Use {
   public:
    explicit Use(std::shared_ptr<BlockDevice> dev);
    Use(Use&&) noexcept = default;
    Use& operator=(Use&&) noexcept = default;
    ~Use();
    BlockDevice* get() const { return dev_.get(); }
    BlockDevice* operator->() const { return dev_.get(); }
    const std::shared_ptr<BlockDevice>& shared() const { return dev_; }

   private:
    std::shared_ptr<BlockDevice> dev_;
  };
  int users() const { return users_.load(); }

  // Retired: deleted by the control plane (force) or daemon stopping. Transports
  // check retired() between requests and close the client.
  void retire() { retired_.store(true); }
  bool retired() const { return retired_.load(); }

  // Called by IoRequest::complete for the ring operations the device started.
  virtual void on_completion(Reactor& reactor, IoRequest& req, int res) = 0;

 protected:
  std::atomic<int> users_{0};
  std::atomic<bool> retired_{false};
  friend class Use;
};

// Finds the device an export name (or ublk device) refers to. The NBD server
// depends only on this. Thread-safety: all methods safe from any thread.
class ExportResolver {
 public:
  virtual ~ExportResolver() = default;
  virtual std::shared_ptr<BlockDevice> find_export(const std::string& name) = 0;
  struct ExportInfo {
    std::string name;
    std::string description;
  };
  virtual std::vector<ExportInfo> list_exports() = 0;

  // What a transport tells a client whose name find_export() did not know,
  // and how long it waits first (repeated wrong access tokens are slowed).
  // The message must not echo a secret name back (nor into the logs).
  struct Refusal {
    std::string message;
    std::chrono::milliseconds delay{0};
  };
  virtual Refusal refuse(const std::string& name) { return {"unknown export '" + name + "'", {}}; }

  // Metadata contexts beyond base:allocation. Called on handshake threads
  // (blocking allowed). meta_contexts: every context name `export_name`
  // offers (for LIST_META_CONTEXT). open_meta_context: the context `name` of
  // the export ready to answer, or nullptr when it does not offer it (SET
  // then omits it, as the spec asks).
  virtual std::vector<std::string> meta_contexts(const std::string& export_name) {
    (void)export_name;
    return {};
  }
  virtual std::shared_ptr<MetaContext> open_meta_context(const std::string& export_name,
                                                         const std::string& name) {
    (void)export_name;
    (void)name;
    return nullptr;
  }
};

}  // namespace rpoint
