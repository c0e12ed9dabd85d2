// Point files, manifests and the reconciliation of the index with the
// region's files (see rebuild.h for the rules, docs/store.md for the crash
// table).
#include "store/rebuild.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>
#include <type_traits>

#include "store/file_util.h"
#include "store/macros.h"
#include "store/pack.h"
#include "store/store.h"

namespace rpoint::store {
namespace {

constexpr const char* kPointFileMagic = "rpoint-point 1";

std::string Hex(const void* p, size_t n) {
  static const char* k = "0123456789abcdef";
  std::string out;
  out.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    uint8_t b = static_cast<const uint8_t*>(p)[i];
    out.push_back(k[b >> 4]);
    out.push_back(k[b & 15]);
  }
  return out;
}

bool Unhex(const std::string& s, std::string* out) {
  if (s.size() % 2) return false;
  auto nib = [](char c) {
    return (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
  };
  out->clear();
  for (size_t i = 0; i < s.size(); i += 2) {
    int a = nib(s[i]), b = nib(s[i + 1]);
    if (a < 0 || b < 0) return false;
    out->push_back(char((a << 4) | b));
  }
  return true;
}

bool ValidManifestName(const std::string& n) {
  if (n.empty() || n.size() > 200 || n[0] == '.') return false;
  for (char c : n) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-' || c == '~';
    if (!ok) return false;
  }
  return true;
}

constexpr const char* kManifestSuffix = ".json";

}  // namespace

std::string PointsDir(const std::string& region) {
  return region + "/points";
}

std::string PointFileName(PointId id) {
  char name[32];
  std::snprintf(name, sizeof(name), "%016llx.point", static_cast<unsigned long long>(id));
  return name;
}

std::optional<PointId> ParsePointFileName(const std::string& name) {
  if (name.size() != 22 || name.compare(16, 6, ".point") != 0) return std::nullopt;
  std::string raw;
  if (!Unhex(name.substr(0, 16), &raw)) return std::nullopt;
  PointId v = 0;
  for (char c : raw) v = (v << 8) | uint8_t(c);
  return v;
}

std::string EncodePointFile(const PointRecord& r) {
  std::ostringstream o;
  o << kPointFileMagic << "\n"
    << "id " << r.id << "\n"
    << "root " << r.root.hex() << "\n"
    << "size " << r.size << "\n"
    << "chunk_size " << r.chunk_size << "\n"
    << "fanout " << r.fanout << "\n"
    << "depth " << r.depth << "\n"
    << "parent " << r.parent << "\n"
    << "created_ns " << r.created_ns << "\n"
    << "new_chunks " << r.new_chunks << "\n"
    << "new_chunk_bytes " << r.new_chunk_bytes << "\n"
    << "new_pages " << r.new_pages << "\n"
    << "put_slots " << r.put_slots << "\n"
    << "tag " << Hex(r.tag.data(), r.tag.size()) << "\n"
    << "end\n";
  return o.str();
}

Result<PointRecord> DecodePointFile(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  if (!std::getline(in, line) || line != kPointFileMagic) {
    return Status::InvalidArgument("not a point file (first line is not '" +
                                   std::string(kPointFileMagic) + "')");
  }
  std::map<std::string, std::string> kv;
  bool end = false;
  while (std::getline(in, line)) {
    if (line == "end") {
      end = true;
      break;
    }
    size_t sp = line.find(' ');
    kv[line.substr(0, sp)] = sp == std::string::npos ? "" : line.substr(sp + 1);
  }
  if (!end) return Status::InvalidArgument("point file is truncated (no 'end' line)");
  auto num = [&](const char* k, auto* out) -> Status {
    auto it = kv.find(k);
    if (it == kv.end() || it->second.empty()) {
      return Status::InvalidArgument(std::string("point file has no '") + k + "'");
    }
    errno = 0;
    char* e = nullptr;
    long long v = std::strtoll(it->second.c_str(), &e, 10);
    if (errno != 0 || *e != '\0') {
      return Status::InvalidArgument(std::string("point file: bad '") + k + "'");
    }
    *out = static_cast<std::remove_pointer_t<decltype(out)>>(v);
    return Status::Ok();
  };
  PointRecord r;
  STORE_RETURN_IF_ERROR(num("id", &r.id));
  STORE_RETURN_IF_ERROR(num("size", &r.size));
  STORE_RETURN_IF_ERROR(num("chunk_size", &r.chunk_size));
  STORE_RETURN_IF_ERROR(num("fanout", &r.fanout));
  STORE_RETURN_IF_ERROR(num("depth", &r.depth));
  STORE_RETURN_IF_ERROR(num("parent", &r.parent));
  STORE_RETURN_IF_ERROR(num("created_ns", &r.created_ns));
  STORE_RETURN_IF_ERROR(num("new_chunks", &r.new_chunks));
  STORE_RETURN_IF_ERROR(num("new_chunk_bytes", &r.new_chunk_bytes));
  STORE_RETURN_IF_ERROR(num("new_pages", &r.new_pages));
  STORE_RETURN_IF_ERROR(num("put_slots", &r.put_slots));
  std::string raw;
  if (!Unhex(kv["root"], &raw) || raw.size() != Digest::kSize) {
    return Status::InvalidArgument("point file: bad 'root'");
  }
  std::memcpy(r.root.b.data(), raw.data(), Digest::kSize);
  if (!kv.count("tag") || !Unhex(kv["tag"], &r.tag)) {
    return Status::InvalidArgument("point file: bad 'tag'");
  }
  if (r.id == 0 || !ValidChunkSize(r.chunk_size) || r.depth == 0 || r.depth > 16) {
    return Status::InvalidArgument("point file: id, chunk_size or depth out of range");
  }
  return r;
}

Status Store::write_point_file(const PointRecord& r) {
  return WriteFileAtomic(points_dir_, PointFileName(r.id), EncodePointFile(r), kRegionFileMode);
}

Status Store::check_complete_locked(const PointRecord& r,
                                    std::unordered_set<Digest, DigestHash>* seen) {
  if (r.fanout != kFanout) return Status::Unsupported("point has another fanout");
  std::vector<std::pair<Digest, uint32_t>> todo{{r.root, r.depth}};
  while (!todo.empty()) {
    auto [d, level] = todo.back();
    todo.pop_back();
    if (d.is_zero() || !seen->insert(d).second) continue;
    STORE_ASSIGN_OR_RETURN(auto loc, catalog_->lookup(d));
    if (!loc) return Status::NotFound("page " + d.short_hex() + " is in no pack");
    STORE_ASSIGN_OR_RETURN(auto fd, pack_fd_locked(loc->pack));
    STORE_ASSIGN_OR_RETURN(auto page, read_page_at(d, *loc, *fd));
    for (const Digest& e : page->e) {
      if (e.is_zero()) continue;
      if (level > 1) {
        todo.emplace_back(e, level - 1);
      } else if (seen->insert(e).second) {
        STORE_ASSIGN_OR_RETURN(auto c, catalog_->lookup(e));
        if (!c) return Status::NotFound("chunk " + e.short_hex() + " is in no pack");
      }
    }
  }
  return Status::Ok();
}

Status Store::reconcile(bool at_open, RepairReport* rep) {
  // --- packs: every sealed pack file is indexed, none is deleted -------------
  STORE_ASSIGN_OR_RETURN(auto rows, catalog_->packs());
  std::unordered_set<uint64_t> known;
  uint64_t max_id = 0;
  for (const PackRow& r : rows) {
    known.insert(r.id);
    max_id = std::max(max_id, r.id);
  }
  std::vector<std::pair<uint64_t, std::string>> unknown;
  STORE_ASSIGN_OR_RETURN(auto subs, ListDir(packs_dir_));
  for (const std::string& sub : subs) {
    std::string subdir = packs_dir_ + "/" + sub;
    auto names = ListDir(subdir);
    if (!names.ok()) continue;  // a stray file, not a subdirectory
    bool changed = false;
    for (const std::string& n : names.value()) {
      std::string path = subdir + "/" + n;
      if (EndsWith(n, ".tmp")) {
        // Renamed only once sealed: a .tmp was never complete and nothing
        // names it. Only at Open, when no writer of ours can own it.
        auto id = ParsePackName(n.substr(0, n.size() - 4));
        if (id) max_id = std::max(max_id, *id);
        if (at_open && ::unlink(path.c_str()) == 0) {
          ++rep->tmp_removed;
          changed = true;
        }
        continue;
      }
      auto id = ParsePackName(n);
      if (!id) continue;
      max_id = std::max(max_id, *id);
      ++rep->packs_on_disk;
      if (known.erase(*id) == 0) unknown.emplace_back(*id, path);
    }
    if (changed) STORE_RETURN_IF_ERROR(FsyncDir(subdir));
  }
  // Newest first: when two packs hold the same digest (a repack interrupted,
  // a copy stored again after a quarantine), the later copy is indexed.
  std::sort(unknown.begin(), unknown.end(), std::greater<>());
  for (const auto& [id, path] : unknown) {
    auto opened = OpenFile(path, O_RDONLY | O_CLOEXEC, 0, "pack.open");
    UniqueFd fd = opened.ok() ? std::move(opened).value() : UniqueFd();
    auto entries =
        fd ? ReadPackTrailer(fd.get(), id) : Result<std::vector<PackEntry>>(opened.status());
    if (!entries.ok()) {
      spdlog::error(
          "store {}: pack file {} is not in the index and cannot be indexed: {}; "
          "left in place (`rpoint region gc <region> --orphans` deletes it)",
          opts_.dir, path, entries.status().ToString());
      rep->packs_unreadable.push_back({id, entries.status().message()});
      continue;
    }
    struct stat st {};
    ::fstat(fd.get(), &st);
    SealedPack sp;
    sp.id = id;
    sp.bytes = uint64_t(st.st_size);
    sp.entries = std::move(entries).value();
    STORE_RETURN_IF_ERROR(catalog_->add_pack(sp, nullptr).status());
    ++rep->packs_indexed;
    rep->objects_indexed += sp.entries.size();
  }
  for (uint64_t id : known) {
    // Verify reports exactly which points this damages.
    spdlog::error("store {}: pack {} is in the index but its file is missing", opts_.dir, id);
    rep->packs_missing.push_back(id);
  }
  uint64_t next = std::max<uint64_t>(next_pack_id_.load(), max_id + 1);
  next_pack_id_.store(next);

  // --- points: records and point files agree ------------------------------
  STORE_ASSIGN_OR_RETURN(auto recs, catalog_->list_points());
  std::unordered_map<PointId, const PointRecord*> in_db;
  for (const PointRecord& r : recs) in_db[r.id] = &r;
  STORE_ASSIGN_OR_RETURN(PointId max_point, catalog_->max_point_id());
  STORE_ASSIGN_OR_RETURN(auto files, ListDir(points_dir_));
  std::unordered_set<PointId> have_file;
  std::vector<PointRecord> to_import;
  for (const std::string& n : files) {
    if (EndsWith(n, ".tmp")) {
      // WriteFileAtomic's leftover: that point's transaction never ran.
      if (::unlink((points_dir_ + "/" + n).c_str()) == 0) ++rep->tmp_removed;
      continue;
    }
    auto id = ParsePointFileName(n);
    if (!id) continue;
    max_point = std::max(max_point, *id);
    have_file.insert(*id);
    if (in_db.count(*id)) continue;
    auto text = ReadWholeFile(points_dir_ + "/" + n);
    Result<PointRecord> rec = text.ok() ? DecodePointFile(text.value()) : text.status();
    if (rec.ok() && rec->id != *id) rec = Status::InvalidArgument("id differs from the file name");
    if (!rec.ok()) {
      spdlog::error("store {}: point file {} cannot be read: {}; left in place", opts_.dir, n,
                    rec.status().ToString());
      rep->points_incomplete.push_back(*id);
      continue;
    }
    to_import.push_back(std::move(rec).value());
  }
  std::unordered_set<Digest, DigestHash> seen;
  for (const PointRecord& r : to_import) {
    Status ok = check_complete_locked(r, &seen);
    if (!ok.ok()) {
      spdlog::error("store {}: point {} ({}) is not imported: {}; its file is kept", opts_.dir,
                    r.id, r.tag, ok.ToString());
      rep->points_incomplete.push_back(r.id);
      continue;
    }
    STORE_RETURN_IF_ERROR(catalog_->add_pack(SealedPack{}, &r).status());
    spdlog::warn("store {}: point {} ({}) imported from its point file", opts_.dir, r.id, r.tag);
    ++rep->points_imported;
  }
  for (const PointRecord& r : recs) {
    if (have_file.count(r.id)) continue;
    STORE_RETURN_IF_ERROR(write_point_file(r));
    ++rep->point_files_written;
  }
  next_point_id_.store(std::max<PointId>(next_point_id_.load(), max_point + 1));

  if (rep->tmp_removed > 0) {
    spdlog::warn("store {}: removed {} unfinished file(s) left by an interrupted writer", opts_.dir,
                 rep->tmp_removed);
  }
  if (rep->packs_indexed > 0) {
    spdlog::warn("store {}: re-indexed {} pack(s) ({} objects) from their trailers", opts_.dir,
                 rep->packs_indexed, rep->objects_indexed);
  }
  spdlog::info("store {}: {} packs, next pack id {}, next point id {}", opts_.dir,
               rep->packs_on_disk, next_pack_id_.load(), next_point_id_.load());
  return Status::Ok();
}

Result<RepairReport> Store::repair() {
  std::lock_guard<std::mutex> run(gc_run_mu_);
  std::unique_lock<std::shared_mutex> g(gc_mu_);  // no writer starts meanwhile
  {
    std::lock_guard<std::mutex> lock(reg_mu_);
    if (!writers_.empty()) {
      return Status::Conflict("region " + opts_.dir + ": points are being written; retry later");
    }
  }
  RepairReport rep;
  STORE_RETURN_IF_ERROR(reconcile(false, &rep));
  return rep;
}

Result<OrphanReport> Store::delete_unindexed_packs() {
  std::lock_guard<std::mutex> run(gc_run_mu_);
  std::unique_lock<std::shared_mutex> g(gc_mu_);
  {
    std::lock_guard<std::mutex> lock(reg_mu_);
    if (!writers_.empty()) {
      return Status::Conflict("region " + opts_.dir + ": points are being written; retry later");
    }
  }
  STORE_ASSIGN_OR_RETURN(auto rows, catalog_->packs());
  std::unordered_set<uint64_t> known;
  for (const PackRow& r : rows) known.insert(r.id);
  OrphanReport rep;
  STORE_ASSIGN_OR_RETURN(auto subs, ListDir(packs_dir_));
  for (const std::string& sub : subs) {
    std::string subdir = packs_dir_ + "/" + sub;
    auto names = ListDir(subdir);
    if (!names.ok()) continue;
    bool changed = false;
    for (const std::string& n : names.value()) {
      auto id = ParsePackName(n);
      if (!id || known.count(*id)) continue;
      std::string path = subdir + "/" + n;
      struct stat st {};
      uint64_t bytes = ::stat(path.c_str(), &st) == 0 ? uint64_t(st.st_size) : 0;
      if (::unlink(path.c_str()) != 0) return Status::FromErrno(errno, "unlink " + path);
      spdlog::warn("store {}: deleted pack file {}: not in the index (operator request)", opts_.dir,
                   path);
      drop_pack_fd_locked(*id);
      ++rep.packs_deleted;
      rep.bytes_freed += bytes;
      changed = true;
    }
    if (changed) STORE_RETURN_IF_ERROR(FsyncDir(subdir));
  }
  return rep;
}

Status Store::put_manifest(const std::string& name, const std::string& content) {
  if (!ValidManifestName(name)) return Status::InvalidArgument("bad manifest name '" + name + "'");
  return WriteFileAtomic(opts_.dir + "/manifests", name + kManifestSuffix, content,
                         kRegionFileMode);
}

Status Store::remove_manifest(const std::string& name) {
  if (!ValidManifestName(name)) return Status::InvalidArgument("bad manifest name '" + name + "'");
  return RemoveFileDurable(opts_.dir + "/manifests", name + kManifestSuffix);
}

Result<std::vector<std::pair<std::string, std::string>>> Store::manifests() {
  std::string dir = opts_.dir + "/manifests";
  STORE_ASSIGN_OR_RETURN(auto names, ListDir(dir));
  std::sort(names.begin(), names.end());
  std::vector<std::pair<std::string, std::string>> out;
  for (const std::string& n : names) {
    if (!EndsWith(n, kManifestSuffix)) continue;  // *.tmp: an unfinished replacement
    auto text = ReadWholeFile(dir + "/" + n);
    if (!text.ok()) {
      spdlog::error("store {}: manifest {}: {}", opts_.dir, n, text.status().ToString());
      continue;
    }
    out.emplace_back(n.substr(0, n.size() - std::string(kManifestSuffix).size()),
                     std::move(text).value());
  }
  return out;
}

}  // namespace rpoint::store
