#include "engine/block_device.h"

namespace rpoint {

void IoRequest::complete(int res, uint32_t) {
  // The device that started the ring operation continues (or finishes) it.
  device_->on_completion(*reactor_, *this, res);
}

Status BlockDevice::check_range(uint64_t offset, uint64_t length) const {
  uint64_t sz = size();
  if (offset > sz || length > sz - offset) {
    return Status::OutOfRange("request [" + std::to_string(offset) + ", +" +
                              std::to_string(length) + ") is beyond the end of '" + name() +
                              "' (" + std::to_string(sz) + " bytes)");
  }
  return Status::Ok();
}

BlockDevice::Use::Use(std::shared_ptr<BlockDevice> dev) : dev_(std::move(dev)) {
  if (dev_) dev_->users_.fetch_add(1);
}

BlockDevice::Use::~Use() {
  if (dev_) dev_->users_.fetch_sub(1);
}

}  // namespace rpoint
