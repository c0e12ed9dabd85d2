#include "store/pack.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/fault_injection.h"
#include "store/file_util.h"
#include "store/macros.h"

namespace rpoint::store {

Result<std::unique_ptr<PackWriter>> PackWriter::Create(const std::string& packs_dir, uint64_t id,
                                                       size_t buffer_bytes) {
  std::unique_ptr<PackWriter> w(new PackWriter());
  w->packs_dir_ = packs_dir;
  w->id_ = id;
  std::string sub = PackSubdir(packs_dir, id);
  bool created = false;
  STORE_RETURN_IF_ERROR(MakeDirs(sub, kRegionDirMode, &created));
  // A new subdirectory must itself be durable before a pack inside it is.
  if (created) STORE_RETURN_IF_ERROR(FsyncDir(packs_dir));
  w->final_path_ = PackPath(packs_dir, id);
  w->tmp_path_ = w->final_path_ + ".tmp";
  w->fd_.reset(::open(w->tmp_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640));
  if (!w->fd_) return Status::FromErrno(errno, "create " + w->tmp_path_);
  w->buf_.resize(std::max<size_t>(buffer_bytes, 1 << 20));
  PackHeader h{};
  std::memcpy(h.magic, kPackMagic, sizeof(h.magic));
  h.version = kPackVersion;
  h.header_bytes = kPackHeaderBytes;
  h.pack_id = id;
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  h.created_ns = int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
  std::memset(w->buf_.data(), 0, kPackHeaderBytes);
  std::memcpy(w->buf_.data(), &h, sizeof(h));
  w->buf_used_ = kPackHeaderBytes;
  w->size_ = kPackHeaderBytes;
  return w;
}

PackWriter::~PackWriter() {
  if (!sealed_ && fd_) ::unlink(tmp_path_.c_str());
}

Status PackWriter::flush() {
  if (buf_used_ == 0) return Status::Ok();
  STORE_RETURN_IF_ERROR(
      PwriteFull(fd_.get(), buf_.data(), buf_used_, buf_file_off_, tmp_path_, "pack.write"));
  // Start writeback now, in the background: by seal() time most of the pack is
  // already on disk and the fdatasync is short.
  (void)::sync_file_range(fd_.get(), static_cast<off_t>(buf_file_off_),
                          static_cast<off_t>(buf_used_), SYNC_FILE_RANGE_WRITE);
  buf_file_off_ += buf_used_;
  buf_used_ = 0;
  return Status::Ok();
}

Result<uint64_t> PackWriter::append(ObjectKind kind, const Digest& d, const void* data, size_t len,
                                    size_t stored_len) {
  if (sealed_) return Status::Internal("append to a sealed pack");
  if (len > stored_len) return Status::Internal("object longer than its stored length");
  uint64_t off = size_;
  if (buf_used_ + stored_len > buf_.size()) STORE_RETURN_IF_ERROR(flush());
  if (stored_len > buf_.size()) {
    // Bigger than the whole buffer (huge chunk sizes): write it straight through.
    STORE_RETURN_IF_ERROR(PwriteFull(fd_.get(), data, len, buf_file_off_, tmp_path_, "pack.write"));
    if (stored_len > len) {
      std::vector<char> zeros(stored_len - len, 0);
      STORE_RETURN_IF_ERROR(PwriteFull(fd_.get(), zeros.data(), zeros.size(), buf_file_off_ + len,
                                       tmp_path_, "pack.write"));
    }
    buf_file_off_ += stored_len;
  } else {
    std::memcpy(buf_.data() + buf_used_, data, len);
    if (stored_len > len) std::memset(buf_.data() + buf_used_ + len, 0, stored_len - len);
    buf_used_ += stored_len;
  }
  size_ += stored_len;
  PackEntry e{};
  e.digest = d;
  e.offset = off;
  e.length = uint32_t(stored_len);
  e.kind = uint8_t(kind);
  entries_.push_back(e);
  return off;
}

Result<SealedPack> PackWriter::seal() {
  if (sealed_) return Status::Internal("pack sealed twice");
  STORE_RETURN_IF_ERROR(flush());
  // Trailer + footer: what the pack holds, so it can be checked (and the index
  // rebuilt) from the file alone.
  PackFooter f{};
  std::memcpy(f.magic, kPackEndMagic, sizeof(f.magic));
  f.version = kPackVersion;
  f.count = uint32_t(entries_.size());
  f.trailer_offset = size_;
  f.trailer_digest = Sha256(entries_.data(), entries_.size() * sizeof(PackEntry));
  f.pack_id = id_;
  size_t tlen = entries_.size() * sizeof(PackEntry);
  std::vector<char> tail(tlen + sizeof(PackFooter));
  if (tlen > 0) std::memcpy(tail.data(), entries_.data(), tlen);
  std::memcpy(tail.data() + tlen, &f, sizeof(f));
  STORE_RETURN_IF_ERROR(
      PwriteFull(fd_.get(), tail.data(), tail.size(), size_, tmp_path_, "pack.write"));
  uint64_t file_size = size_ + tail.size();
  if (fault::Fdatasync("pack.sync", fd_.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync " + tmp_path_);
  }
  if (fault::Rename("pack.rename", tmp_path_.c_str(), final_path_.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + tmp_path_);
  }
  sealed_ = true;
  STORE_RETURN_IF_ERROR(FsyncDir(PackSubdir(packs_dir_, id_), "pack.dirsync"));
  fd_.reset();
  std::vector<char>().swap(buf_);
  SealedPack sp;
  sp.id = id_;
  sp.bytes = file_size;
  sp.entries = std::move(entries_);
  return sp;
}

Result<std::vector<PackEntry>> ReadPackTrailer(int fd, uint64_t expect_id) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::FromErrno(errno, "stat pack");
  uint64_t size = uint64_t(st.st_size);
  std::string what = "pack " + std::to_string(expect_id);
  if (size < kPackHeaderBytes + sizeof(PackFooter)) return Status::IoError(what + ": truncated");
  PackHeader h{};
  STORE_RETURN_IF_ERROR(PreadFull(fd, &h, sizeof(h), 0, what));
  if (std::memcmp(h.magic, kPackMagic, sizeof(h.magic)) != 0 || h.version != kPackVersion ||
      h.pack_id != expect_id) {
    return Status::IoError(what + ": bad header");
  }
  PackFooter f{};
  STORE_RETURN_IF_ERROR(PreadFull(fd, &f, sizeof(f), size - sizeof(f), what));
  if (std::memcmp(f.magic, kPackEndMagic, sizeof(f.magic)) != 0 || f.pack_id != expect_id ||
      f.trailer_offset + uint64_t(f.count) * sizeof(PackEntry) + sizeof(f) != size) {
    return Status::IoError(what + ": bad footer (torn or not a sealed pack)");
  }
  std::vector<PackEntry> entries(f.count);
  if (f.count > 0) {
    STORE_RETURN_IF_ERROR(
        PreadFull(fd, entries.data(), f.count * sizeof(PackEntry), f.trailer_offset, what));
  }
  if (Sha256(entries.data(), entries.size() * sizeof(PackEntry)) != f.trailer_digest) {
    return Status::IoError(what + ": trailer checksum mismatch");
  }
  return entries;
}

}  // namespace rpoint::store
