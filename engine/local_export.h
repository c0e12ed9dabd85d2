// LocalExport: a transport that serves BlockDevices as block devices of this
// host's kernel (ublk/), as opposed to NBD, whose clients connect to us.
//
// disks/ drives it through this interface (creating, recovering and deleting
// a disk's kernel device with the disk), the daemon supplies the
// implementation; the engine knows nothing of the transport behind it.
//
// Thread-safety: every method is safe from any thread and may block (kernel
// control commands, with timeouts); never call one on a reactor thread.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "engine/block_device.h"

namespace rpoint {

class LocalExport {
 public:
  virtual ~LocalExport() = default;

  // What a GET of the disk shows.
  struct State {
    int dev_id = -1;
    std::string device_path;  // e.g. /dev/ublkb0
    std::string state;        // Live, Quiesced, Dead, Recovering, Unavailable, Stopped
    std::string error;        // why it is not served, when it is not
    std::string copy_mode;    // how request data moves: "zero", "user", "buffer" ("" unknown)
  };

  // Ok, or Unsupported with the reason (module not loaded) when this host
  // cannot serve local devices at all.
  virtual Status available() = 0;
  // Serves `dev` as the kernel device `dev_id` when that one still exists (a
  // device kept across a restart of the daemon: recovered, same number, no
  // I/O error for its users), else as a new device (dev_id < 0: any number).
  // Returns the device number.
  virtual Result<int> serve(const std::string& name, std::shared_ptr<BlockDevice> dev,
                            int dev_id) = 0;
  // Stops and deletes the kernel device of `name` (its users see it vanish).
  virtual Status remove(const std::string& name) = 0;
  // Ok unless the kernel device of `name` is in use on this host: Conflict when
  // it is mounted or held open exclusively (what remove() would pull from
  // under a filesystem). A probe: a mount right after it is not prevented.
  virtual Status check_idle(const std::string& name) = 0;
  virtual State state(const std::string& name) = 0;
  // Daemon shutdown: stops serving every device, leaving the kernel devices
  // for the next start to recover (their I/O waits meanwhile).
  virtual void detach_all() = 0;
};

}  // namespace rpoint
