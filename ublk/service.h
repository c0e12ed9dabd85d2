// UblkService: the LocalExport of rpointd, every disk served over ublk.
//
// Opens /dev/ublk-control lazily (a host whose module is loaded after
// rpointd started works without a restart); where it is missing, every disk
// asked for gets the reason (module ublk_drv) instead of a device. Keeps one
// UblkDevice per disk and decides, for a disk recorded with a device number,
// whether that kernel device is still there to recover.
//
// Thread-safety: every method is safe from any thread (one mutex; control
// commands run under it, bounded by their timeouts). Not on the data path.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "engine/local_export.h"
#include "ublk/control.h"
#include "ublk/device.h"

namespace rpoint {

struct UblkServiceOptions {
  UblkDeviceOptions device;
  std::string control_path = kUblkControlPath;
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
};

class UblkService final : public LocalExport {
 public:
  explicit UblkService(UblkServiceOptions opts) : opts_(std::move(opts)) {}
  ~UblkService() override;  // detach_all()

  Status available() override;
  Result<int> serve(const std::string& name, std::shared_ptr<BlockDevice> dev, int dev_id) override;
  Status remove(const std::string& name) override;
  Status check_idle(const std::string& name) override;
  State state(const std::string& name) override;
  void detach_all() override;

 private:
  Status open_locked();

  const UblkServiceOptions opts_;
  std::mutex mu_;
  std::unique_ptr<UblkControl> ctl_;
  std::map<std::string, std::unique_ptr<UblkDevice>> devices_;
  std::map<std::string, std::string> errors_;  // disks that could not be served, and why
};

}  // namespace rpoint
