#include "store/pack.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/fault_injection.h"
#include "store/file_util.h"
#include "store/macros.h"

namespace rpoint::store {
namespace {

// O_DIRECT wants buffer, offset and length aligned to the logical block size;
// 4 KiB covers every block device in use (objects are 4 KiB multiples).
constexpr size_t kDirectAlign = 4096;

}  // namespace

BufferPool::BufferPool(size_t buffer_bytes, size_t max)
    : bytes_((buffer_bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign),
      max_(std::max<size_t>(max, 1)) {}

BufferPool::~BufferPool() {
  for (char* b : free_) std::free(b);
}

char* BufferPool::get() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !free_.empty() || out_ + free_.size() < max_; });
  ++out_;
  if (!free_.empty()) {
    char* b = free_.back();
    free_.pop_back();
    return b;
  }
  lock.unlock();
  // Aligned for O_DIRECT. Never released to the system before the pool goes,
  // so a pack's buffers are faulted in once per writer, not once per pack.
  char* b = static_cast<char*>(std::aligned_alloc(kDirectAlign, bytes_));
  if (b == nullptr) std::abort();  // as operator new would: out of memory
  return b;
}

void BufferPool::put(char* b) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(b);
    --out_;
  }
  cv_.notify_one();
}

Result<std::unique_ptr<PackWriter>> PackWriter::Create(const std::string& packs_dir, uint64_t id,
                                                       size_t buffer_bytes,
                                                       std::shared_ptr<BufferPool> pool,
                                                       bool direct) {
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
  STORE_ASSIGN_OR_RETURN(w->fd_, OpenFile(w->tmp_path_, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC,
                                          kRegionFileMode, "pack.open"));
  // A second descriptor for the aligned buffer writes; a filesystem without
  // O_DIRECT (EINVAL) gets every write through the page cache instead. (No
  // fault point: its failure is that fallback, not an error.)
  if (direct) {
    if (auto dfd = OpenFile(w->tmp_path_, O_WRONLY | O_DIRECT | O_CLOEXEC); dfd.ok()) {
      w->dfd_ = std::move(dfd).value();
    }
  }
  w->pool_ = pool ? std::move(pool)
                  : std::make_shared<BufferPool>(std::max<size_t>(buffer_bytes, 1 << 20), 2);
  w->buf_bytes_ = w->pool_->buffer_bytes();
  STORE_RETURN_IF_ERROR(w->take_buffer());
  PackHeader h{};
  std::memcpy(h.magic, kPackMagic, sizeof(h.magic));
  h.version = kPackVersion;
  h.header_bytes = kPackHeaderBytes;
  h.pack_id = id;
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  h.created_ns = int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
  std::memset(w->cur_, 0, kPackHeaderBytes);
  std::memcpy(w->cur_, &h, sizeof(h));
  w->buf_used_ = kPackHeaderBytes;
  w->size_ = kPackHeaderBytes;
  return w;
}

PackWriter::~PackWriter() {
  {
    // Buffers not yet written are dropped (the file goes); the one being
    // written ends first, so the flusher never outlives the descriptors.
    std::lock_guard<std::mutex> lock(fmu_);
    for (const Flush& f : queue_) pool_->put(f.buf);
    in_flight_ -= queue_.size();
    queue_.clear();
    stop_ = true;
  }
  fcv_.notify_all();
  if (flusher_.joinable()) flusher_.join();
  if (cur_) pool_->put(cur_);
  if (!sealed_ && fd_) ::unlink(tmp_path_.c_str());
}

Status PackWriter::take_buffer() {
  {
    std::lock_guard<std::mutex> lock(fmu_);
    if (!write_error_.ok()) return write_error_;
  }
  cur_ = pool_->get();  // waits while every buffer is being written
  buf_used_ = 0;
  return Status::Ok();
}

void PackWriter::hand_off() {
  if (cur_ == nullptr || buf_used_ == 0) return;
  {
    std::lock_guard<std::mutex> lock(fmu_);
    queue_.push_back(Flush{cur_, buf_used_, buf_file_off_});
    ++in_flight_;
    if (!flusher_.joinable()) flusher_ = std::thread([this] { flusher_loop(); });
  }
  fcv_.notify_all();
  buf_file_off_ += buf_used_;
  buf_used_ = 0;
  cur_ = nullptr;
}

void PackWriter::flusher_loop() {
  std::unique_lock<std::mutex> lock(fmu_);
  for (;;) {
    fcv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, nothing left
    Flush f = queue_.front();
    queue_.pop_front();
    bool failed = !write_error_.ok();
    lock.unlock();
    // After a failure the pack is lost anyway: later buffers are not written.
    Status s = failed ? Status::Ok() : write_out(f);
    pool_->put(f.buf);
    lock.lock();
    if (!s.ok() && write_error_.ok()) write_error_ = s;
    --in_flight_;
    fcv_.notify_all();
  }
}

Status PackWriter::write_out(const Flush& f) {
  size_t direct = 0;
  STORE_RETURN_IF_ERROR(
      PwriteDirect(dfd_.get(), fd_.get(), f.buf, f.len, f.off, tmp_path_, "pack.write", &direct));
  // What went through the page cache: start its writeback now, in the
  // background, so by seal() time the fdatasync is short.
  if (direct < f.len) {
    (void)::sync_file_range(fd_.get(), static_cast<off_t>(f.off + direct),
                            static_cast<off_t>(f.len - direct), SYNC_FILE_RANGE_WRITE);
  }
  return Status::Ok();
}

Status PackWriter::wait_flushed() {
  std::unique_lock<std::mutex> lock(fmu_);
  fcv_.wait(lock, [&] { return in_flight_ == 0; });
  stop_ = true;
  fcv_.notify_all();
  std::thread t = std::move(flusher_);
  Status s = write_error_;
  lock.unlock();
  if (t.joinable()) t.join();
  return s;
}

Result<uint64_t> PackWriter::append(ObjectKind kind, const Digest& d, const void* data, size_t len,
                                    size_t stored_len) {
  if (sealed_ || closed_) return Status::Internal("append to a closed pack");
  if (len > stored_len) return Status::Internal("object longer than its stored length");
  uint64_t off = size_;
  if (cur_ != nullptr && buf_used_ > 0 && buf_used_ + stored_len > buf_bytes_) hand_off();
  if (cur_ == nullptr) {
    STORE_RETURN_IF_ERROR(take_buffer());
  } else {
    std::lock_guard<std::mutex> lock(fmu_);
    if (!write_error_.ok()) return write_error_;
  }
  if (stored_len > buf_bytes_) {
    // Bigger than a whole buffer (huge chunk sizes): written straight through.
    STORE_RETURN_IF_ERROR(PwriteFull(fd_.get(), data, len, buf_file_off_, tmp_path_, "pack.write"));
    if (stored_len > len) {
      std::vector<char> zeros(stored_len - len, 0);
      STORE_RETURN_IF_ERROR(PwriteFull(fd_.get(), zeros.data(), zeros.size(), buf_file_off_ + len,
                                       tmp_path_, "pack.write"));
    }
    buf_file_off_ += stored_len;
  } else {
    std::memcpy(cur_ + buf_used_, data, len);
    if (stored_len > len) std::memset(cur_ + buf_used_ + len, 0, stored_len - len);
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

void PackWriter::close() {
  if (closed_) return;
  closed_ = true;
  hand_off();
  if (cur_) {
    pool_->put(cur_);
    cur_ = nullptr;
  }
}

Result<SealedPack> PackWriter::seal() {
  if (sealed_) return Status::Internal("pack sealed twice");
  close();
  STORE_RETURN_IF_ERROR(wait_flushed());
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
  // One fdatasync per pack: the page-cache writes (trailer, fallbacks) and
  // the metadata of the O_DIRECT ones (size, extents), with the device's
  // cache flush that makes the direct writes durable too.
  if (fault::Fdatasync("pack.sync", fd_.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync " + tmp_path_);
  }
  if (fault::Rename("pack.rename", tmp_path_.c_str(), final_path_.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + tmp_path_);
  }
  sealed_ = true;
  STORE_RETURN_IF_ERROR(FsyncDir(PackSubdir(packs_dir_, id_), "pack.dirsync"));
  fd_.reset();
  dfd_.reset();
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
