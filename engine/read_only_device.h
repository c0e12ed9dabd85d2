// ReadOnlyDevice: a read-only face of another BlockDevice.
//
// A disk served writable by one transport (ublk) may be read over another
// (NBD) at the same time, but written by only one: the second transport gets
// this view. Reads, flushes, block status go to the device below; writes,
// trims and zeroes fail with EPERM here (and NBD advertises READ_ONLY from
// caps()), so no write bypasses the transport that owns the disk. Access
// grants (restore/access_grants.cpp) serve a restore point through one too,
// under their own name and retired flag, so revoking a grant cuts only its
// clients.
//
// Thread-safety: as the device below; retire() is the view's own, and a
// device below that retires (a deleted disk or point) retires the view too.
#pragma once

#include <cerrno>
#include <memory>

#include "engine/block_device.h"

namespace rpoint {

class ReadOnlyDevice final : public BlockDevice {
 public:
  // label: the name transports log (default: the device below's).
  explicit ReadOnlyDevice(std::shared_ptr<BlockDevice> inner, std::string label = "")
      : inner_(std::move(inner)), label_(std::move(label)) {}

  const std::string& name() const override { return label_.empty() ? inner_->name() : label_; }
  uint64_t size() const override { return inner_->size(); }
  DeviceCaps caps() const override {
    DeviceCaps c = inner_->caps();
    c.read_only = true;
    c.can_trim = c.can_zero = c.can_fast_zero = false;
    return c;
  }
  void submit(Reactor& reactor, IoRequest& req) override {
    if (inner_->retired()) retire();
    bool mutation =
        req.kind == IoKind::kWrite || req.kind == IoKind::kTrim || req.kind == IoKind::kWriteZeroes;
    if (!mutation && !retired()) return inner_->submit(reactor, req);
    // Completes through the ring, never inside submit().
    req.device_ = this;
    req.reactor_ = &reactor;
    req.done_ = mutation ? EPERM : ESHUTDOWN;
    io_uring_prep_nop(reactor.sqe(&req));
  }
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length,
                                           size_t max_extents) override {
    return inner_->block_status(offset, length, max_extents);
  }
  void on_completion(Reactor&, IoRequest& req, int) override {
    req.on_done(-static_cast<int>(req.done_));
  }
  bool inner_retired() const { return inner_->retired(); }

 private:
  std::shared_ptr<BlockDevice> inner_;
  std::string label_;
};

}  // namespace rpoint
