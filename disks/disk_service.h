// DiskService: the managed disks of this daemon and their durable metadata.
//
// Creates sparse backing files under the disks directory or adopts existing
// files and block devices, keeps their records in the metadata database
// (SQLite, so they survive restarts and crashes), keeps the open FileDisk of
// each, and resolves NBD export names to them.
//
// Thread-safety: every method is safe from any thread (one internal mutex;
// nothing here is on the data path).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/block_device.h"
#include "engine/local_export.h"

namespace rpoint {

class FileDisk;

struct DiskServiceOptions {
  std::string disks_dir;    // where created disks' files live
  std::string metadata_db;  // SQLite file
  bool direct_io = false;   // open disks with O_DIRECT for aligned I/O
  // Change tracking for restore points: each disk's bitmap generations live in
  // <tracking_dir>/<disk>. Empty: no tracking (restore points refuse the disk).
  std::string tracking_dir;
  // Directories holding rpointd's own files (state dir, regions, staging,
  // tracking, the metadata database's directory). Nothing inside one of them,
  // after resolving symlinks, can be adopted: a disk over a tracking bitmap or
  // a pack would let a client corrupt restore points undetected. The disks
  // directory is always refused as well.
  std::vector<std::string> reserved_dirs;
  // Adoption allow-list: a path is adopted only when its real path lies inside
  // one of these (after resolving their symlinks too). Adopting gives NBD
  // clients read and write access to the file, so this is root-equivalent
  // for whoever can reach the control socket. "/" allows every path; the
  // daemon passes the config's adopt_paths. An empty list refuses adoption.
  std::vector<std::string> adopt_paths = {"/"};
  // Serves disks whose export is "ublk" as kernel block devices (the
  // daemon's UblkService; it outlives the DiskService). nullptr: only NBD.
  LocalExport* local_export = nullptr;
};

struct DiskRecord {
  std::string name;
  std::string path;
  uint64_t size_bytes = 0;
  bool adopted = false;         // true: an existing file/device; false: created by us
  bool block_device = false;
  std::string kind = "managed";  // managed | shared | ephemeral
  std::string time_created;      // RFC 3339 UTC
  int attached_clients = 0;      // live transport users (not persisted)
  // Change tracking block size (a power of two, 4 KiB..4 MiB); also the
  // chunk size of this disk's restore points.
  uint32_t tracking_granularity = 64 * 1024;
  // Creating while a restore fills it (not exported yet); Succeeded otherwise.
  std::string provisioning_state = "Succeeded";
  // For a disk restored from a restore point: the disk restore point's id.
  std::string source_resource_id;
  // Empty when the disk is being served. Otherwise why it is not (e.g. its
  // backing file vanished or shrank while the daemon was down); the record
  // stays so an operator can see it, fix the file and restart, or delete it.
  std::string error;
  // error.code of a GET when `error` is set.
  std::string error_code = "BackingStoreUnavailable";
  // nbd | ublk. A ublk disk is served writable as /dev/ublkbN (`ublk` tells
  // its number and state) and read-only to NBD clients: one writer at a time.
  std::string export_mode = "nbd";
  LocalExport::State ublk;
};

class DiskService : public ExportResolver {
 public:
  static Result<std::unique_ptr<DiskService>> Open(const DiskServiceOptions& options);
  ~DiskService() override = default;

  static constexpr uint32_t kDefaultTrackingGranularity = 64 * 1024;

  // tracking_granularity: see DiskRecord; ValidateTrackingGranularity.
  // export_mode: nbd | ublk (ValidateExport); ublk where the host cannot
  // serve it fails with the reason of export_available() and leaves nothing.
  virtual Result<DiskRecord> create(const std::string& name, uint64_t size_bytes,
                                    const std::string& kind,
                                    uint32_t tracking_granularity = kDefaultTrackingGranularity,
                                    const std::string& export_mode = "nbd") = 0;
  virtual Result<DiskRecord> adopt(const std::string& name, const std::string& path,
                                   const std::string& kind,
                                   uint32_t tracking_granularity = kDefaultTrackingGranularity,
                                   const std::string& export_mode = "nbd") = 0;
  // Ok when disks can be served with export_mode on this host; else why not
  // (ublk: /dev/ublk-control missing, module ublk_drv not loaded).
  virtual Status export_available(const std::string& export_mode) = 0;
  // Changes how a disk is served (and records it). A disk still being
  // restored starts being served in its new way when the restore is done.
  virtual Result<DiskRecord> set_export(const std::string& name,
                                        const std::string& export_mode) = 0;
  virtual Result<DiskRecord> get(const std::string& name) = 0;
  virtual std::vector<DiskRecord> list() = 0;
  virtual Result<DiskRecord> resize(const std::string& name, uint64_t new_size_bytes) = 0;
  // Conflict when clients are attached and !force; with force they are cut off.
  virtual Status remove(const std::string& name, bool force) = 0;
  // Daemon stop: ublk devices stop being served but stay in the kernel for
  // the next start to recover (docs/api.md, "ublk").
  virtual void detach_local_exports() = 0;
  // fdatasync every open disk (shutdown).
  virtual void sync_all() = 0;

  // ---- for RestoreService ----
  // A managed disk in provisioning state Creating, to be filled by a restore:
  // its record exists (the name is taken, GET shows it) but find_export and
  // list_exports skip it until mark_provisioned(). A failed fill calls
  // remove(name, true). On the next start, RestoreService removes disks still
  // Creating (a restore interrupted by a crash).
  virtual Result<DiskRecord> create_provisioning(const std::string& name, uint64_t size_bytes,
                                                 uint32_t tracking_granularity,
                                                 const std::string& source_resource_id) = 0;
  virtual Status mark_provisioned(const std::string& name) = 0;
  // The open engine disk (for cuts and restores); nullptr when there is no
  // such disk or it is unavailable.
  virtual std::shared_ptr<FileDisk> file_disk(const std::string& name) = 0;

  // Valid names: 1-63 chars of [A-Za-z0-9._-], not starting with '.' or '-'.
  // Every resource (disk, VM, collection, restore point) follows this rule;
  // `what` names the kind in the message ("VM name").
  static Status ValidateName(const std::string& name, const std::string& what = "disk name");

  // Largest disk rpointd creates or grows to: 1 PiB (2^50). Far above any VM
  // disk in use, far below where offset + length arithmetic in 64 bits (and
  // off_t, which is signed) gets near overflow; it also turns unit mistakes
  // (a size in KiB taken as bytes * 1024 twice) into a clear 400 instead of a
  // huge sparse file. Filesystems may refuse earlier (ext4 with 4 KiB blocks:
  // 16 TiB), which comes back as OutOfRange from ftruncate.
  static constexpr uint64_t kMaxSizeBytes = uint64_t{1} << 50;
  // Sizes are whole 512-byte sectors: the smallest logical block any client
  // (NBD, ublk, a guest's virtio-blk) addresses.
  static constexpr uint64_t kSizeAlignment = 512;
  // Positive, a multiple of kSizeAlignment, at most kMaxSizeBytes.
  static Status ValidateSize(uint64_t size_bytes);
  // nbd | ublk.
  static Status ValidateExport(const std::string& export_mode);
  // managed | shared | ephemeral.
  static Status ValidateKind(const std::string& kind);
  // A power of two from 4 KiB to 4 MiB.
  static Status ValidateTrackingGranularity(uint64_t bytes);
};

}  // namespace rpoint
