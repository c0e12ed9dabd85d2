#include "disks/disk_service.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "common/unique_fd.h"
#include "disks/disk_files.h"
#include "disks/metadata_db.h"
#include "engine/file_disk.h"
#include "engine/read_only_device.h"

namespace rpoint {

namespace {

constexpr const char* kDiskFileSuffix = ".raw";

// The name a managed disk's file takes while its delete commits.
std::string Tombstone(const std::string& path) {
  return path + ".deleting";
}

bool IsNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

// What the service knows of one disk. `disk` is null while the disk is in the
// error state (its backing store could not be opened).
// A client that has just closed its socket stays attached until its reactor
// sees the hang-up (microseconds, more under load): a DELETE sent the moment
// `qemu-img` or `nbdcopy` exits must not get 409 for it. remove() waits up to
// this long, without the service lock, for the count to reach 0.
constexpr std::chrono::milliseconds kDetachGrace{500};

struct Entry {
  DiskRow row;
  std::shared_ptr<FileDisk> disk;
  // Block devices are also held open with O_EXCL, so nothing can mount them
  // (and we cannot adopt one that is mounted) while rpointd serves them.
  UniqueFd exclusive_fd;
  std::string error;
  std::string error_code = "BackingStoreUnavailable";
  // What NBD clients get of a disk another transport (ublk) writes.
  std::shared_ptr<ReadOnlyDevice> ro_view;
};

int UsersOf(const Entry& e) {
  return (e.disk ? e.disk->users() : 0) + (e.ro_view ? e.ro_view->users() : 0);
}

void RetireEntry(Entry& e) {
  if (e.disk) e.disk->retire();
  if (e.ro_view) e.ro_view->retire();
}

// Opens a block device with O_EXCL; Conflict when it is mounted or claimed.
Result<UniqueFd> ClaimBlockDevice(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC));
  if (!fd) {
    if (errno == EBUSY) {
      return Status::Conflict(path + " is in use (mounted, or held open exclusively)");
    }
    return Status::FromErrno(errno, "open " + path);
  }
  return fd;
}

std::string CanonicalPath(const std::string& path) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) return path;
  return buf;
}

// True when `path` is `dir` or lies below it (both canonical, no trailing '/').
bool IsInside(const std::string& path, const std::string& dir) {
  if (dir == "/") return true;
  return path == dir || (path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
                         path[dir.size()] == '/');
}

// (device, inode) naming a file, or (rdev) naming a block device, so the same
// storage reached through a symlink, a hard link or a second device node is
// recognised.
struct Identity {
  dev_t dev = 0;
  ino_t ino = 0;
  dev_t rdev = 0;
  bool block = false;
  bool operator==(const Identity& o) const {
    return block == o.block && (block ? rdev == o.rdev : (dev == o.dev && ino == o.ino));
  }
};

Identity IdentityOf(const struct stat& st) {
  Identity id;
  id.block = S_ISBLK(st.st_mode);
  id.dev = st.st_dev;
  id.ino = st.st_ino;
  id.rdev = st.st_rdev;
  return id;
}

class DiskServiceImpl final : public DiskService {
 public:
  DiskServiceImpl(DiskServiceOptions options, std::string disks_dir, std::unique_ptr<MetadataDb> db)
      : options_(std::move(options)), disks_dir_(std::move(disks_dir)), db_(std::move(db)) {}

  ~DiskServiceImpl() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [name, e] : disks_) RetireEntry(e);
  }

  Status load() {
    auto rows = db_->list_disks();
    if (!rows.ok()) return rows.status();
    std::lock_guard<std::mutex> lock(mu_);
    for (DiskRow& row : rows.value()) {
      Entry e;
      e.row = std::move(row);
      undo_interrupted_delete(e.row);
      open_entry(e);
      std::string name = e.row.name;
      disks_.emplace(name, std::move(e));
    }
    sweep_orphans();
    // Startup: nothing else runs yet, so serving under the lock holds no one up.
    for (auto& [name, e] : disks_) {
      if (e.row.export_mode != "ublk" || !e.disk || e.row.provisioning_state != "Succeeded") {
        continue;
      }
      auto id = serve_local(e);
      if (!id.ok()) {
        e.error = id.status().message();
        e.error_code = "UblkUnavailable";
        RetireEntry(e);
        e.disk.reset();
        e.exclusive_fd.reset();
      }
    }
    size_t bad = std::count_if(disks_.begin(), disks_.end(),
                               [](const auto& kv) { return !kv.second.error.empty(); });
    spdlog::info("disk service: {} disk(s) in {}, {} unavailable", disks_.size(),
                 options_.metadata_db, bad);
    return Status::Ok();
  }

  Result<DiskRecord> create(const std::string& name, uint64_t size_bytes, const std::string& kind,
                            uint32_t tracking_granularity,
                            const std::string& export_mode) override {
    if (Status s = check_export(export_mode); !s.ok()) return s;
    auto r =
        create_disk(name, size_bytes, kind, tracking_granularity, "Succeeded", "", export_mode);
    if (!r.ok() || export_mode == "nbd") return r;
    return start_local_or_undo(name);
  }

  Status export_available(const std::string& export_mode) override {
    if (Status s = ValidateExport(export_mode); !s.ok()) return s;
    if (export_mode == "nbd") return Status::Ok();
    if (!options_.local_export) return Status::Unsupported("ublk is not enabled in this rpointd");
    return options_.local_export->available();
  }

  Result<DiskRecord> set_export(const std::string& name, const std::string& export_mode) override {
    if (Status s = check_export(export_mode); !s.ok()) return s;
    std::string was;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = disks_.find(name);
      if (it == disks_.end()) return not_found(name);
      Entry& e = it->second;
      was = e.row.export_mode;
      if (was == export_mode) return record(e);
      Status s = db_->update_disk_export(name, export_mode, e.row.ublk_dev_id);
      if (!s.ok()) return s;
      e.row.export_mode = export_mode;
    }
    spdlog::info("disk {}: export {} -> {}", name, was, export_mode);
    if (export_mode == "ublk") return start_local(name);
    if (options_.local_export) {
      Status s = options_.local_export->remove(name);
      if (!s.ok()) spdlog::warn("disk {}: {}", name, s.ToString());
    }
    return get(name);
  }

  void detach_local_exports() override {
    if (options_.local_export) options_.local_export->detach_all();
  }

  Result<DiskRecord> create_provisioning(const std::string& name, uint64_t size_bytes,
                                         uint32_t tracking_granularity,
                                         const std::string& source_resource_id) override {
    return create_disk(name, size_bytes, "managed", tracking_granularity, "Creating",
                       source_resource_id);
  }

  Status mark_provisioned(const std::string& name) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = disks_.find(name);
      if (it == disks_.end()) return not_found(name);
      if (it->second.row.provisioning_state == "Succeeded") return Status::Ok();
      // The fill is durable (fill_disk fdatasynced it): the marker goes before
      // the row says Succeeded. A crash in between leaves the row Creating
      // (removed at the next start, as any interrupted restore); with the
      // marker gone, a lost metadata.db then recovers a whole disk.
      Status s = RemoveFile(FillingMarker(it->second.row.path));
      if (!s.ok()) return s;
      s = db_->update_disk_provisioning(name, "Succeeded");
      if (!s.ok()) return s;
      it->second.row.provisioning_state = "Succeeded";
      spdlog::info("disk {}: provisioned", name);
      if (it->second.row.export_mode != "ublk") return Status::Ok();
    }
    // Its data is all there: now it may appear as /dev/ublkbN.
    auto r = start_local(name);
    return r.ok() ? Status::Ok() : r.status();
  }

  std::shared_ptr<FileDisk> file_disk(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = disks_.find(name);
    if (it == disks_.end()) return nullptr;
    return it->second.disk;
  }

  Result<DiskRecord> create_disk(const std::string& name, uint64_t size_bytes,
                                 const std::string& kind, uint32_t tracking_granularity,
                                 const std::string& provisioning_state,
                                 const std::string& source_resource_id,
                                 const std::string& export_mode = "nbd") {
    Status s = ValidateName(name);
    if (s.ok()) s = ValidateSize(size_bytes);
    if (s.ok()) s = ValidateKind(kind);
    if (s.ok()) s = ValidateTrackingGranularity(tracking_granularity);
    if (!s.ok()) return s;

    std::lock_guard<std::mutex> lock(mu_);
    if (disks_.count(name)) return Status::AlreadyExists("disk '" + name + "' already exists");
    DiskRow row;
    row.name = name;
    row.path = disks_dir_ + "/" + name + kDiskFileSuffix;
    row.size_bytes = size_bytes;
    row.adopted = false;
    row.block_device = false;
    row.kind = kind;
    row.time_created = NowRfc3339();
    row.tracking_granularity = tracking_granularity;
    row.provisioning_state = provisioning_state;
    row.source_resource_id = source_resource_id;
    row.export_mode = export_mode;

    // A tracking directory left by an earlier disk of this name (a crash
    // between its row's deletion and the directory's) must not be taken over.
    remove_tracking(name);
    // A disk a restore fills is marked so on the file system before its file
    // exists, until the fill is durable (mark_provisioned): should
    // metadata.db be lost meanwhile, the start-up sweep must not take the
    // half-filled file for a whole disk.
    const bool filling = provisioning_state == "Creating";
    if (filling) {
      s = CreateFillingMarker(row.path, source_resource_id);
      if (!s.ok()) return s;
    }
    auto undo_files = [&] {
      (void)RemoveFile(row.path);
      if (filling) (void)RemoveFile(FillingMarker(row.path));
    };
    // File durable first, then the row: a crash in between leaves an orphan
    // file (swept at the next start), never a row without its file.
    s = CreateSparseFile(row.path, size_bytes);
    if (!s.ok()) {
      if (filling) (void)RemoveFile(FillingMarker(row.path));
      return s;
    }
    auto disk = FileDisk::Open(disk_options(row));
    if (!disk.ok()) {
      undo_files();
      return disk.status();
    }
    s = db_->insert_disk(row);
    if (!s.ok()) {
      disk.value()->retire();
      disk.value().reset();
      undo_files();
      remove_tracking(name);
      return s;
    }
    Entry e;
    e.row = row;
    e.disk = std::move(disk).value();
    DiskRecord rec = record(e);
    disks_.emplace(name, std::move(e));
    spdlog::info("disk {}: created {} ({} bytes, {}, tracking {} bytes{})", name, row.path,
                 size_bytes, kind, tracking_granularity,
                 provisioning_state == "Creating" ? ", being restored" : "");
    return rec;
  }

  Result<DiskRecord> adopt(const std::string& name, const std::string& path,
                           const std::string& kind, uint32_t tracking_granularity,
                           const std::string& export_mode) override {
    auto r = adopt_disk(name, path, kind, tracking_granularity, export_mode);
    if (!r.ok() || export_mode == "nbd") return r;
    return start_local_or_undo(name);
  }

  Result<DiskRecord> adopt_disk(const std::string& name, const std::string& path,
                                const std::string& kind, uint32_t tracking_granularity,
                                const std::string& export_mode) {
    Status s = check_export(export_mode);
    if (s.ok()) s = ValidateName(name);
    if (s.ok()) s = ValidateKind(kind);
    if (s.ok()) s = ValidateTrackingGranularity(tracking_granularity);
    if (!s.ok()) return s;
    if (path.empty() || path[0] != '/') {
      return Status::InvalidArgument("path must be absolute, got '" + path + "'");
    }
    if (path.find('\0') != std::string::npos) {
      return Status::InvalidArgument("path contains a NUL byte");
    }
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      int err = errno;
      if (err == ENOENT || err == ENOTDIR) {
        return Status::InvalidArgument("path " + path + " does not exist");
      }
      return Status::FromErrno(err, "stat " + path);
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
      return Status::InvalidArgument("path " + path +
                                     " is neither a regular file nor a block device");
    }
    std::string canonical = CanonicalPath(path);
    Identity id = IdentityOf(st);
    s = check_adoptable(path, canonical, st);
    if (!s.ok()) return s;

    std::lock_guard<std::mutex> lock(mu_);
    if (disks_.count(name)) return Status::AlreadyExists("disk '" + name + "' already exists");
    for (const auto& [other, e] : disks_) {
      struct stat ost {};
      bool same = e.row.path == canonical ||
                  (::stat(e.row.path.c_str(), &ost) == 0 && IdentityOf(ost) == id);
      if (same) {
        return Status::Conflict(path + " is already managed as disk '" + other + "'");
      }
    }

    Entry e;
    if (id.block) {
      auto claim = ClaimBlockDevice(canonical);
      if (!claim.ok()) return claim.status();
      e.exclusive_fd = std::move(claim).value();
    }
    e.row.name = name;
    e.row.path = canonical;
    e.row.tracking_granularity = tracking_granularity;
    remove_tracking(name);
    auto disk = FileDisk::Open(disk_options(e.row));
    if (!disk.ok()) return disk.status();
    uint64_t size = disk.value()->size();
    if (size == 0 || size % kSizeAlignment != 0) {
      return Status::InvalidArgument("path " + path + " is " + std::to_string(size) +
                                     " bytes; a disk must be a positive multiple of " +
                                     std::to_string(kSizeAlignment) + " bytes");
    }
    e.row.name = name;
    e.row.path = canonical;
    e.row.size_bytes = size;
    e.row.adopted = true;
    e.row.block_device = id.block;
    e.row.kind = kind;
    e.row.time_created = NowRfc3339();
    e.row.export_mode = export_mode;
    s = db_->insert_disk(e.row);
    if (!s.ok()) {
      disk.value()->retire();
      disk.value().reset();
      remove_tracking(name);
      return s;
    }
    e.disk = std::move(disk).value();
    DiskRecord rec = record(e);
    disks_.emplace(name, std::move(e));
    spdlog::info("disk {}: adopted {} ({} bytes, {})", name, canonical, size, kind);
    return rec;
  }

  Result<DiskRecord> get(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = disks_.find(name);
    if (it == disks_.end()) return not_found(name);
    return record(it->second);
  }

  std::vector<DiskRecord> list() override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<DiskRecord> out;
    out.reserve(disks_.size());
    for (const auto& [name, e] : disks_) out.push_back(record(e));
    return out;
  }

  Result<DiskRecord> resize(const std::string& name, uint64_t new_size_bytes) override {
    Status s = ValidateSize(new_size_bytes);
    if (!s.ok()) return s;
    std::shared_ptr<FileDisk> disk;
    uint64_t cur = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = disks_.find(name);
      if (it == disks_.end()) return not_found(name);
      Entry& e = it->second;
      if (!e.disk) return Status::Conflict("disk '" + name + "' is unavailable: " + e.error);
      cur = e.disk->size();
      if (new_size_bytes == cur) return record(e);
      if (e.row.block_device) {
        return Status::Unsupported("disk '" + name + "' is the block device " + e.row.path +
                                   "; resize the device itself");
      }
      if (e.row.export_mode == "ublk") {
        // The driver interface we build against (6.1) cannot change a live
        // device's size: /dev/ublkbN would keep the old one.
        return Status::Unsupported("disk '" + name + "' is served over ublk, whose devices " +
                                   "cannot grow while served; serve it over NBD to resize it");
      }
      if (new_size_bytes < cur) {
        return Status::OutOfRange("disks can only grow: '" + name + "' is " + std::to_string(cur) +
                                  " bytes, asked for " + std::to_string(new_size_bytes));
      }
      disk = e.disk;
    }
    // Outside the lock: grow() fsyncs the file, which waits for every dirty
    // page a busy VM has written, and NBD handshakes resolve exports through
    // this mutex. The file grows (durably) before the row records it: after a
    // crash in between, load() finds the file larger and takes its size.
    s = disk->grow(new_size_bytes);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = disks_.find(name);
    if (it == disks_.end() || it->second.disk != disk) return not_found(name);  // deleted meanwhile
    Entry& e = it->second;
    uint64_t size = disk->size();  // a concurrent larger resize may have won
    if (size > e.row.size_bytes) {
      s = db_->update_disk_size(name, size);
      if (!s.ok()) return s;
      e.row.size_bytes = size;
    }
    spdlog::info("disk {}: grown from {} to {} bytes", name, cur, new_size_bytes);
    return record(e);
  }

  void wait_for_clients_to_leave(const std::string& name) {
    std::shared_ptr<FileDisk> disk;
    std::shared_ptr<ReadOnlyDevice> view;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = disks_.find(name);
      if (it != disks_.end()) {
        disk = it->second.disk;
        view = it->second.ro_view;
      }
    }
    auto users = [&] { return (disk ? disk->users() : 0) + (view ? view->users() : 0); };
    auto deadline = std::chrono::steady_clock::now() + kDetachGrace;
    while (users() > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  Status remove(const std::string& name, bool force) override {
    if (!force) wait_for_clients_to_leave(name);
    bool local = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = disks_.find(name);
      if (it == disks_.end()) return not_found(name);
      int users = UsersOf(it->second);
      if (users > 0 && !force) {
        return Status::Conflict("disk '" + name + "' has " + std::to_string(users) +
                                " attached client(s); disconnect them or delete with force");
      }
      local = it->second.row.export_mode == "ublk";
    }
    // A mounted /dev/ublkbN would lose its device under the filesystem: refused
    // like attached NBD clients (outside the lock: the probe opens the device).
    if (local && !force && options_.local_export) {
      Status busy = options_.local_export->check_idle(name);
      if (!busy.ok()) return Status::Conflict("disk '" + name + "': " + busy.message());
    }
    // The kernel device goes first (STOP_DEV flushes through the disk, which
    // must still be open), outside the lock: it may take seconds.
    if (local && options_.local_export) {
      Status s = options_.local_export->remove(name);
      if (!s.ok()) spdlog::warn("disk {}: {}", name, s.ToString());
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto it = disks_.find(name);
    if (it == disks_.end()) return not_found(name);
    Entry& e = it->second;
    int users = UsersOf(e);
    // The file takes its tombstone name first, then the row goes, then the
    // file: a crash before the row's delete commits finds the tombstone and the
    // row, and the next start renames it back (the delete was never
    // acknowledged); a crash after it finds a tombstone no row names, and
    // removes it. A plain `NAME.raw` no row names is therefore never a deleted
    // disk, and holds data only when metadata.db lost its row: sweep_orphans
    // recovers it instead of deleting it.
    const std::string tomb = Tombstone(e.row.path);
    if (!e.row.adopted) {
      // A tombstone already there is a committed delete's whose unlink failed.
      struct stat st {};
      if (::lstat(tomb.c_str(), &st) == 0) (void)RemoveFile(tomb);
      if (::lstat(e.row.path.c_str(), &st) == 0) {
        Status r = RenameFile(e.row.path, tomb);
        if (!r.ok()) return r;
      }  // else an unavailable disk whose file is gone: nothing to keep
    }
    Status s = db_->delete_disk(name);
    if (!s.ok()) {
      if (!e.row.adopted && ::access(tomb.c_str(), F_OK) == 0) {
        Status r = RenameFile(tomb, e.row.path);
        if (!r.ok()) spdlog::error("disk {}: cannot undo its delete: {}", name, r.ToString());
      }
      return s;
    }
    // Retired even with no user: a client resolving the export right now gets
    // a device the transport closes at its first request.
    RetireEntry(e);
    Entry gone = std::move(e);
    disks_.erase(it);
    if (!gone.row.adopted) {
      s = RemoveFile(tomb);
      if (!s.ok()) spdlog::warn("disk {}: deleted, but its file stays: {}", name, s.ToString());
      // A restore's marker (a failed or interrupted fill): after the file,
      // so the file is never there without it. A crash first: swept.
      if (HasFillingMarker(gone.row.path)) (void)RemoveFile(FillingMarker(gone.row.path));
    }
    remove_tracking(name);
    spdlog::info("disk {}: deleted{}{}", name,
                 force && users > 0 ? " (forced, clients cut off)" : "",
                 gone.row.adopted ? " (adopted storage left in place)" : "");
    return Status::Ok();
  }

  void sync_all() override {
    std::vector<std::shared_ptr<FileDisk>> disks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [name, e] : disks_) {
        if (e.disk) disks.push_back(e.disk);
      }
    }
    for (auto& d : disks) {
      Status s = d->sync();
      if (!s.ok()) spdlog::error("disk {}: sync failed: {}", d->name(), s.ToString());
    }
  }

  std::shared_ptr<BlockDevice> find_export(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = disks_.find(name);
    if (it == disks_.end() || !it->second.disk || it->second.disk->retired()) return nullptr;
    if (it->second.row.provisioning_state != "Succeeded") return nullptr;  // being restored
    Entry& e = it->second;
    if (e.row.export_mode == "ublk") {
      // ublk writes it: NBD clients read.
      if (!e.ro_view) e.ro_view = std::make_shared<ReadOnlyDevice>(e.disk);
      return e.ro_view;
    }
    return e.disk;
  }

  std::vector<ExportInfo> list_exports() override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<ExportInfo> out;
    for (const auto& [name, e] : disks_) {
      if (!e.disk || e.row.provisioning_state != "Succeeded") continue;
      out.push_back(
          {name, "rpointd " + e.row.kind + " disk " + name +
                     (e.row.export_mode == "ublk" ? " (read-only: served over ublk)" : "")});
    }
    return out;
  }

 private:
  FileDiskOptions disk_options(const DiskRow& row) const {
    FileDiskOptions o;
    o.name = row.name;
    o.path = row.path;
    o.direct = options_.direct_io;
    if (!options_.tracking_dir.empty()) {
      o.tracking_dir = options_.tracking_dir + "/" + row.name;
      o.tracking_granularity = row.tracking_granularity;
    }
    return o;
  }

  // Refuses paths a disk must not be made of: rpointd's own files (the disks
  // directory's files that no record names are removed at start-up; a disk
  // over a tracking bitmap, a database or a pack would let a client corrupt
  // restore points undetected), hard-linked files (a second name may lie in
  // one of those directories: finding it would mean scanning them), and
  // anything outside the adopt_paths allow-list.
  Status check_adoptable(const std::string& path, const std::string& canonical,
                         const struct stat& st) const {
    std::vector<std::string> reserved = options_.reserved_dirs;
    reserved.push_back(disks_dir_);
    for (const std::string& dir : reserved) {
      if (dir.empty()) continue;
      if (IsInside(canonical, CanonicalPath(dir)) || IsInside(canonical, dir)) {
        return Status::InvalidArgument("path " + path + " is inside " + dir +
                                       ", which holds rpointd's own files; adopt files from "
                                       "elsewhere");
      }
    }
    if (S_ISREG(st.st_mode) && st.st_nlink > 1) {
      return Status::InvalidArgument("path " + path + " has " + std::to_string(st.st_nlink) +
                                     " hard links; rpointd adopts only files with a single "
                                     "link (copy it, or remove the other links)");
    }
    for (const std::string& dir : options_.adopt_paths) {
      if (IsInside(canonical, CanonicalPath(dir))) return Status::Ok();
    }
    std::string list;
    for (const std::string& dir : options_.adopt_paths) list += (list.empty() ? "" : ", ") + dir;
    return Status::PermissionDenied(
        "path " + path + (canonical != path ? " (" + canonical + ")" : "") +
        " is outside adopt_paths [" + list + "]; an operator can allow it in the configuration");
  }

  // Drops a disk's change tracking generations (the disk is gone or new).
  void remove_tracking(const std::string& name) {
    if (options_.tracking_dir.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(options_.tracking_dir + "/" + name, ec);
    if (ec) spdlog::warn("disk {}: cannot remove its change tracking: {}", name, ec.message());
  }

  // A valid export this host can serve.
  Status check_export(const std::string& export_mode) {
    if (Status s = ValidateExport(export_mode); !s.ok()) return s;
    if (export_mode == "nbd") return Status::Ok();
    return export_available(export_mode);
  }

  // Serves e's disk over ublk (the recorded device number first) and records
  // the number it got. Under mu_ only at startup.
  Result<int> serve_local(Entry& e) {
    if (!options_.local_export) return Status::Unsupported("ublk is not enabled in this rpointd");
    auto id = options_.local_export->serve(e.row.name, e.disk, e.row.ublk_dev_id);
    if (!id.ok()) return id.status();
    if (id.value() != e.row.ublk_dev_id) {
      Status s = db_->update_disk_export(e.row.name, "ublk", id.value());
      if (!s.ok())
        spdlog::error("disk {}: cannot record ublk {}: {}", e.row.name, id.value(), s.ToString());
      e.row.ublk_dev_id = id.value();
    }
    return id;
  }

  // Serves a disk over ublk, outside mu_ (control commands take time).
  Result<DiskRecord> start_local(const std::string& name) {
    if (!options_.local_export) return Status::Unsupported("ublk is not enabled in this rpointd");
    std::shared_ptr<FileDisk> disk;
    int dev_id = -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = disks_.find(name);
      if (it == disks_.end()) return not_found(name);
      Entry& e = it->second;
      if (!e.disk) return Status::Conflict("disk '" + name + "' is unavailable: " + e.error);
      if (e.row.provisioning_state != "Succeeded") return record(e);  // at mark_provisioned
      disk = e.disk;
      dev_id = e.row.ublk_dev_id;
    }
    auto id = options_.local_export->serve(name, disk, dev_id);
    if (!id.ok()) return id.status();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = disks_.find(name);
    if (it == disks_.end()) return not_found(name);
    Entry& e = it->second;
    if (id.value() != e.row.ublk_dev_id) {
      Status s = db_->update_disk_export(name, "ublk", id.value());
      if (!s.ok()) return s;
      e.row.ublk_dev_id = id.value();
    }
    return record(e);
  }

  // create/adopt with ublk: a disk that cannot be served is not kept.
  Result<DiskRecord> start_local_or_undo(const std::string& name) {
    auto r = start_local(name);
    if (r.ok()) return r;
    Status rm = remove(name, true);
    if (!rm.ok()) spdlog::error("disk {}: cannot undo its creation: {}", name, rm.ToString());
    return r.status();
  }

  static Status not_found(const std::string& name) {
    return Status::NotFound("disk '" + name + "' not found");
  }

  DiskRecord record(const Entry& e) {
    DiskRecord r;
    r.name = e.row.name;
    r.path = e.row.path;
    r.size_bytes = e.disk ? e.disk->size() : e.row.size_bytes;
    r.adopted = e.row.adopted;
    r.block_device = e.row.block_device;
    r.kind = e.row.kind;
    r.time_created = e.row.time_created;
    r.attached_clients = UsersOf(e);
    r.tracking_granularity = e.row.tracking_granularity;
    r.provisioning_state = e.row.provisioning_state;
    r.source_resource_id = e.row.source_resource_id;
    r.error = e.error;
    r.error_code = e.error_code;
    r.export_mode = e.row.export_mode;
    if (r.export_mode == "ublk" && e.error.empty()) {
      if (options_.local_export) {
        r.ublk = options_.local_export->state(e.row.name);
      } else {
        r.ublk.state = "Unavailable";
        r.ublk.error = "ublk is not enabled in this rpointd";
      }
    }
    return r;
  }

  // Opens one recorded disk at start-up; on failure the entry keeps the error.
  void open_entry(Entry& e) {
    const std::string& name = e.row.name;
    struct stat st {};
    if (!e.row.adopted && e.row.provisioning_state == "Succeeded" && HasFillingMarker(e.row.path)) {
      // A row Succeeded over a file a restore was still filling: metadata.db
      // put back from an old copy, from a disk of the same name. Never served.
      e.error = "backing store " + e.row.path +
                " holds a restore interrupted before it was "
                "whole (" +
                FillingMarker(e.row.path) + ", from " + ReadFillingMarker(e.row.path) +
                "); delete the disk and restore it again";
      spdlog::error("disk {}: unavailable: {}", name, e.error);
      return;
    }
    if (::stat(e.row.path.c_str(), &st) != 0) {
      e.error = Status::FromErrno(errno, "backing store " + e.row.path).message();
      spdlog::error("disk {}: unavailable: {}", name, e.error);
      return;
    }
    bool block = S_ISBLK(st.st_mode);
    if (block != e.row.block_device || (!block && !S_ISREG(st.st_mode))) {
      e.error = "backing store " + e.row.path + " is no longer " +
                (e.row.block_device ? "a block device" : "a regular file");
      spdlog::error("disk {}: unavailable: {}", name, e.error);
      return;
    }
    if (block) {
      auto claim = ClaimBlockDevice(e.row.path);
      if (!claim.ok()) {
        e.error = claim.status().message();
        spdlog::error("disk {}: unavailable: {}", name, e.error);
        return;
      }
      e.exclusive_fd = std::move(claim).value();
    }
    auto disk = FileDisk::Open(disk_options(e.row));
    if (!disk.ok()) {
      e.error = disk.status().message();
      e.exclusive_fd.reset();
      spdlog::error("disk {}: unavailable: {}", name, e.error);
      return;
    }
    uint64_t size = disk.value()->size();
    if (size < e.row.size_bytes) {
      // Serving it smaller would silently drop the disk's tail (and restore
      // points' change tracking would no longer match it): keep it out of
      // service until the operator restores the size or deletes the disk.
      e.error = "backing store " + e.row.path + " is " + std::to_string(size) +
                " bytes, smaller than the disk's " + std::to_string(e.row.size_bytes) +
                " (truncated outside rpointd?); restore its size and restart rpointd, or "
                "delete the disk";
      disk.value()->retire();
      e.exclusive_fd.reset();
      spdlog::error("disk {}: unavailable: {}", name, e.error);
      return;
    }
    e.disk = std::move(disk).value();
    if (size > e.row.size_bytes && !block) {
      // A resize whose file grew but whose row did not commit before a crash.
      spdlog::warn("disk {}: file is {} bytes, metadata says {}; keeping the file's size", name,
                   size, e.row.size_bytes);
      Status s = db_->update_disk_size(name, size);
      if (!s.ok()) spdlog::error("disk {}: cannot record its size: {}", name, s.ToString());
      e.row.size_bytes = size;
    } else if (size != e.row.size_bytes) {
      spdlog::warn("disk {}: {} is {} bytes, metadata says {} (changed outside rpointd?)", name,
                   e.row.path, size, e.row.size_bytes);
    }
  }

  // A row whose file is missing but whose tombstone is there: a crash inside
  // delete_disk before the row's delete committed. The delete was never
  // acknowledged, so the disk comes back.
  void undo_interrupted_delete(const DiskRow& row) {
    if (row.adopted) return;
    struct stat st {};
    std::string tomb = Tombstone(row.path);
    if (::lstat(row.path.c_str(), &st) == 0 || errno != ENOENT) return;
    if (::lstat(tomb.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return;
    Status s = RenameFile(tomb, row.path);
    if (s.ok()) {
      spdlog::warn("disk {}: a delete was interrupted before it committed; the disk is kept",
                   row.name);
    } else {
      spdlog::error("disk {}: cannot undo an interrupted delete: {}", row.name, s.ToString());
    }
  }

  // Files in the disks directory that look like ours but no row names:
  // - `NAME.raw.deleting`: a delete whose row had committed; removed.
  // - `NAME.raw` holding no data: a crash between creating the file and
  //   committing its row (never acknowledged, never exported); removed.
  // - `NAME.raw` beside its `NAME.raw.filling` marker: a restore interrupted
  //   before the disk was whole, whose row was lost; removed (it was never
  //   served, and the restore point it came from still holds the data), with
  //   the marker. A marker alone (a crash inside a create or delete) goes too.
  // - `NAME.raw` holding data: its row was lost (metadata.db deleted, or put
  //   back from an old copy). Never deleted: the disk is recovered under its
  //   name, with no change tracking (its next restore point is full).
  void sweep_orphans() {
    std::set<std::string> known;
    for (const auto& [name, e] : disks_) known.insert(e.row.path);
    DIR* dir = ::opendir(disks_dir_.c_str());
    if (!dir) {
      spdlog::warn("disk service: cannot list {}: {}", disks_dir_, std::strerror(errno));
      return;
    }
    std::vector<std::string> tombs, markers;
    std::vector<std::pair<std::string, uint64_t>> orphans;  // path, size
    const std::string suffix = kDiskFileSuffix, tomb_suffix = Tombstone(suffix);
    const std::string marker_suffix = FillingMarker(suffix);
    auto named = [this](const std::string& f, const std::string& sfx) {
      return f.size() > sfx.size() && f.compare(f.size() - sfx.size(), sfx.size(), sfx) == 0 &&
             ValidateName(f.substr(0, f.size() - sfx.size())).ok();
    };
    while (struct dirent* de = ::readdir(dir)) {
      std::string f = de->d_name;
      std::string path = disks_dir_ + "/" + f;
      struct stat st {};
      if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      if (named(f, tomb_suffix)) {
        if (!known.count(path.substr(0, path.size() - tomb_suffix.size() + suffix.size()))) {
          tombs.push_back(path);
        }
      } else if (named(f, suffix) && !known.count(path)) {
        orphans.emplace_back(path, static_cast<uint64_t>(st.st_size));
      } else if (named(f, marker_suffix)) {
        std::string disk_path = path.substr(0, path.size() - marker_suffix.size() + suffix.size());
        if (!known.count(disk_path)) markers.push_back(disk_path);
      }
    }
    ::closedir(dir);
    for (const auto& path : tombs) {
      spdlog::warn("disk service: removing {}: its disk was deleted", path);
      Status s = RemoveFile(path);
      if (!s.ok()) spdlog::warn("disk service: {}", s.ToString());
    }
    std::vector<std::string> empty;
    for (const auto& [path, size] : orphans) {
      if (HasFillingMarker(path)) {
        spdlog::warn(
            "disk service: removing {}: a restore (from {}) was filling it when the daemon "
            "stopped, and no disk record names it (metadata.db lost); it was never whole nor "
            "served, and the restore point still holds its data: restore it again",
            path, ReadFillingMarker(path));
        Status s = RemoveFile(path);
        if (!s.ok()) {
          spdlog::error("disk service: {}; it stays, never served", s.ToString());
          continue;  // the marker stays with it, so the next start tries again
        }
        continue;  // the marker goes below
      }
      auto data = FileHasData(path);
      if (data.ok() && !data.value()) {
        empty.push_back(path);
      } else {
        recover_orphan(path, size, data.ok() ? "" : data.status().ToString());
      }
    }
    if (!options_.tracking_dir.empty()) {
      // Tracking directories of disks deleted just before a crash.
      std::error_code ec;
      std::vector<std::string> stale;
      for (const auto& de : std::filesystem::directory_iterator(options_.tracking_dir, ec)) {
        std::string name = de.path().filename().string();
        if (de.is_directory() && ValidateName(name).ok() && !disks_.count(name)) {
          stale.push_back(name);
        }
      }
      for (const auto& name : stale) {
        spdlog::warn("disk service: removing change tracking of deleted disk {}", name);
        remove_tracking(name);
      }
    }
    for (const auto& path : empty) {
      spdlog::warn(
          "disk service: removing {}: no disk record names it and it holds no data (an "
          "interrupted create)",
          path);
      Status s = RemoveFile(path);
      if (!s.ok()) spdlog::warn("disk service: {}", s.ToString());
    }
    // Markers whose disk file is gone now (removed above, or before a crash).
    for (const auto& disk_path : markers) {
      struct stat st {};
      if (::lstat(disk_path.c_str(), &st) == 0) continue;  // kept above: its marker too
      Status s = RemoveFile(FillingMarker(disk_path));
      if (!s.ok()) spdlog::warn("disk service: {}", s.ToString());
    }
  }

  // Gives a data-holding disk file no row names a row again (sweep_orphans).
  // `size`: its size as the sweep's lstat found it. `why_unsure` is set when
  // the file could not be probed for data: kept then too, since keeping an
  // empty file costs nothing and deleting a full one loses a disk.
  void recover_orphan(const std::string& path, uint64_t size, const std::string& why_unsure) {
    std::string f = path.substr(disks_dir_.size() + 1);
    std::string name = f.substr(0, f.size() - std::char_traits<char>::length(kDiskFileSuffix));
    Status valid = ValidateSize(size);
    if (disks_.count(name) || !valid.ok()) {
      spdlog::error(
          "disk service: {} holds data but no disk record names it, and it cannot be "
          "recovered as disk '{}' ({}); left in place for the operator",
          path, name, disks_.count(name) ? "the name is taken" : valid.message());
      return;
    }
    DiskRow row;
    row.name = name;
    row.path = path;
    row.size_bytes = size;
    row.kind = "managed";
    row.time_created = NowRfc3339();
    row.tracking_granularity = kDefaultTrackingGranularity;
    // Its tracking (if any survived) belongs to a history metadata.db no
    // longer holds: the next restore point of this disk is full.
    remove_tracking(name);
    Status s = db_->insert_disk(row);
    if (!s.ok()) {
      spdlog::error("disk service: cannot recover {} as disk '{}': {}; left in place", path, name,
                    s.ToString());
      return;
    }
    Entry e;
    e.row = row;
    open_entry(e);
    spdlog::warn(
        "disk {}: recovered from {} ({} bytes), which no disk record named{}{}: metadata.db "
        "lost its row; it is served over NBD, kind managed, with no change tracking (its next "
        "restore point is full); add it to its VM again",
        name, path, size,
        why_unsure.empty() ? "" : "; could not tell if it holds data: ", why_unsure);
    disks_.emplace(name, std::move(e));
  }

  const DiskServiceOptions options_;
  const std::string disks_dir_;  // absolute
  std::mutex mu_;
  std::unique_ptr<MetadataDb> db_;
  std::map<std::string, Entry> disks_;
};

}  // namespace

Status DiskService::ValidateName(const std::string& name, const std::string& what) {
  if (name.empty()) return Status::InvalidArgument(what + " is empty");
  if (name.size() > 63) {
    return Status::InvalidArgument(what + " is longer than 63 characters");
  }
  if (name[0] == '.' || name[0] == '-') {
    return Status::InvalidArgument(what + " '" + name + "' must not start with '.' or '-'");
  }
  for (char c : name) {
    if (!IsNameChar(c)) {
      return Status::InvalidArgument(what + " may only contain A-Z, a-z, 0-9, '.', '_' and '-'");
    }
  }
  return Status::Ok();
}

Status DiskService::ValidateSize(uint64_t size_bytes) {
  if (size_bytes == 0) return Status::InvalidArgument("sizeBytes must be positive");
  if (size_bytes % kSizeAlignment != 0) {
    return Status::InvalidArgument("sizeBytes must be a multiple of 512, got " +
                                   std::to_string(size_bytes));
  }
  if (size_bytes > kMaxSizeBytes) {
    return Status::OutOfRange("sizeBytes " + std::to_string(size_bytes) +
                              " is above the limit of 1 PiB (" + std::to_string(kMaxSizeBytes) +
                              " bytes)");
  }
  return Status::Ok();
}

Status DiskService::ValidateExport(const std::string& export_mode) {
  if (export_mode == "nbd" || export_mode == "ublk") return Status::Ok();
  return Status::InvalidArgument("export must be nbd or ublk, got '" + export_mode + "'");
}

Status DiskService::ValidateKind(const std::string& kind) {
  if (kind == "managed" || kind == "shared" || kind == "ephemeral") return Status::Ok();
  return Status::InvalidArgument("kind must be managed, shared or ephemeral, got '" + kind + "'");
}

Status DiskService::ValidateTrackingGranularity(uint64_t bytes) {
  if (bytes < 4096 || bytes > (4u << 20) || (bytes & (bytes - 1)) != 0) {
    return Status::InvalidArgument(
        "trackingGranularityBytes must be a power of two from 4096 to 4194304, got " +
        std::to_string(bytes));
  }
  return Status::Ok();
}

Result<std::unique_ptr<DiskService>> DiskService::Open(const DiskServiceOptions& options) {
  if (options.disks_dir.empty()) return Status::InvalidArgument("disks_dir is not set");
  if (options.metadata_db.empty()) return Status::InvalidArgument("metadata_db is not set");
  Status s = MakeDirs(options.disks_dir, 0700);
  if (!s.ok()) return s;
  s = MakeDirs(DirName(options.metadata_db), 0700);
  if (!s.ok()) return s;
  if (!options.tracking_dir.empty()) {
    s = MakeDirs(options.tracking_dir, 0700);
    if (!s.ok()) return s;
  }
  // Rows store absolute paths, so they stay right whatever the daemon's cwd.
  std::string disks_dir = CanonicalPath(options.disks_dir);
  // A damaged database stops the start (nothing is guessed from it); the
  // message says how to start again without losing a disk.
  auto damaged = [&](const Status& st) {
    if (st.code() != Code::kCorruption) return st;
    return Status(st.code(), st.message() + "; to start without it, move " + options.metadata_db +
                                 " (and its -wal and -shm files) aside: the disks in " +
                                 options.disks_dir +
                                 " are recovered from their files and the "
                                 "restore points from the regions; VMs must be created again");
  };
  auto db = MetadataDb::Open(options.metadata_db);
  if (!db.ok()) return damaged(db.status());
  auto svc = std::make_unique<DiskServiceImpl>(options, disks_dir, std::move(db).value());
  s = svc->load();
  if (!s.ok()) return damaged(s);
  return std::unique_ptr<DiskService>(std::move(svc));
}

}  // namespace rpoint
