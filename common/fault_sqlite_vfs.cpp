#include "common/fault_sqlite_vfs.h"

#include <sqlite3.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>

#include "common/fault_injection.h"

namespace rpoint::fault {
namespace {

// One registered shim per database kind.
struct Shim {
  sqlite3_vfs vfs;
  sqlite3_vfs* real;
  std::string name;
  std::string write_point;
  std::string sync_point;
};

// The shim's file: our header, then the real VFS's file in the same block.
struct File {
  sqlite3_file base;
  const Shim* shim;
  sqlite3_file* real() { return reinterpret_cast<sqlite3_file*>(this + 1); }
};

File* F(sqlite3_file* f) {
  return reinterpret_cast<File*>(f);
}
const sqlite3_io_methods* M(sqlite3_file* f) {
  return F(f)->real()->pMethods;
}

int IoError(int err, int ioerr) {
  return (err == ENOSPC || err == EDQUOT) ? SQLITE_FULL : ioerr;
}

int Close(sqlite3_file* f) {
  int rc = M(f)->xClose(F(f)->real());
  f->pMethods = nullptr;
  return rc;
}
int Read(sqlite3_file* f, void* p, int n, sqlite3_int64 off) {
  return M(f)->xRead(F(f)->real(), p, n, off);
}
int Write(sqlite3_file* f, const void* p, int n, sqlite3_int64 off) {
  Action a = Hit(F(f)->shim->write_point.c_str());
  if (a.error) return IoError(a.error, SQLITE_IOERR_WRITE);
  if (a.shorten && n > 1) {
    // A torn write: half the bytes reach the file, then the error SQLite's
    // unix VFS reports for a short write.
    (void)M(f)->xWrite(F(f)->real(), p, n / 2, off);
    return SQLITE_FULL;
  }
  return M(f)->xWrite(F(f)->real(), p, n, off);
}
int Truncate(sqlite3_file* f, sqlite3_int64 size) {
  return M(f)->xTruncate(F(f)->real(), size);
}
int Sync(sqlite3_file* f, int flags) {
  Action a = Hit(F(f)->shim->sync_point.c_str());
  if (a.error || a.shorten) return IoError(a.error, SQLITE_IOERR_FSYNC);
  return M(f)->xSync(F(f)->real(), flags);
}
int FileSize(sqlite3_file* f, sqlite3_int64* size) {
  return M(f)->xFileSize(F(f)->real(), size);
}
int Lock(sqlite3_file* f, int l) {
  return M(f)->xLock(F(f)->real(), l);
}
int Unlock(sqlite3_file* f, int l) {
  return M(f)->xUnlock(F(f)->real(), l);
}
int CheckReservedLock(sqlite3_file* f, int* out) {
  return M(f)->xCheckReservedLock(F(f)->real(), out);
}
int FileControl(sqlite3_file* f, int op, void* arg) {
  return M(f)->xFileControl(F(f)->real(), op, arg);
}
int SectorSize(sqlite3_file* f) {
  return M(f)->xSectorSize(F(f)->real());
}
int DeviceCharacteristics(sqlite3_file* f) {
  return M(f)->xDeviceCharacteristics(F(f)->real());
}
int ShmMap(sqlite3_file* f, int pg, int sz, int extend, void volatile** pp) {
  return M(f)->xShmMap(F(f)->real(), pg, sz, extend, pp);
}
int ShmLock(sqlite3_file* f, int off, int n, int flags) {
  return M(f)->xShmLock(F(f)->real(), off, n, flags);
}
void ShmBarrier(sqlite3_file* f) {
  M(f)->xShmBarrier(F(f)->real());
}
int ShmUnmap(sqlite3_file* f, int del) {
  return M(f)->xShmUnmap(F(f)->real(), del);
}
int Fetch(sqlite3_file* f, sqlite3_int64 off, int n, void** pp) {
  return M(f)->xFetch(F(f)->real(), off, n, pp);
}
int Unfetch(sqlite3_file* f, sqlite3_int64 off, void* p) {
  return M(f)->xUnfetch(F(f)->real(), off, p);
}

// Version 1 methods for files whose real methods are version 1 (no WAL
// shared memory, no mmap), version 3 otherwise.
const sqlite3_io_methods kMethodsV1 = {1,
                                       Close,
                                       Read,
                                       Write,
                                       Truncate,
                                       Sync,
                                       FileSize,
                                       Lock,
                                       Unlock,
                                       CheckReservedLock,
                                       FileControl,
                                       SectorSize,
                                       DeviceCharacteristics,
                                       nullptr,
                                       nullptr,
                                       nullptr,
                                       nullptr,
                                       nullptr,
                                       nullptr};
const sqlite3_io_methods kMethodsV3 = {3,
                                       Close,
                                       Read,
                                       Write,
                                       Truncate,
                                       Sync,
                                       FileSize,
                                       Lock,
                                       Unlock,
                                       CheckReservedLock,
                                       FileControl,
                                       SectorSize,
                                       DeviceCharacteristics,
                                       ShmMap,
                                       ShmLock,
                                       ShmBarrier,
                                       ShmUnmap,
                                       Fetch,
                                       Unfetch};

int Open(sqlite3_vfs* vfs, const char* name, sqlite3_file* f, int flags, int* out_flags) {
  const Shim* shim = static_cast<const Shim*>(vfs->pAppData);
  File* file = F(f);
  file->shim = shim;
  f->pMethods = nullptr;
  int rc = shim->real->xOpen(shim->real, name, file->real(), flags, out_flags);
  const sqlite3_io_methods* m = file->real()->pMethods;
  if (m) f->pMethods = m->iVersion >= 3 ? &kMethodsV3 : &kMethodsV1;
  return rc;
}

#define REAL static_cast<const Shim*>(vfs->pAppData)->real
int Delete(sqlite3_vfs* vfs, const char* n, int sync) {
  return REAL->xDelete(REAL, n, sync);
}
int Access(sqlite3_vfs* vfs, const char* n, int flags, int* out) {
  return REAL->xAccess(REAL, n, flags, out);
}
int FullPathname(sqlite3_vfs* vfs, const char* n, int len, char* out) {
  return REAL->xFullPathname(REAL, n, len, out);
}
void* DlOpen(sqlite3_vfs* vfs, const char* n) {
  return REAL->xDlOpen(REAL, n);
}
void DlError(sqlite3_vfs* vfs, int n, char* msg) {
  REAL->xDlError(REAL, n, msg);
}
void (*DlSym(sqlite3_vfs* vfs, void* h, const char* sym))(void) {
  return REAL->xDlSym(REAL, h, sym);
}
void DlClose(sqlite3_vfs* vfs, void* h) {
  REAL->xDlClose(REAL, h);
}
int Randomness(sqlite3_vfs* vfs, int n, char* out) {
  return REAL->xRandomness(REAL, n, out);
}
int Sleep(sqlite3_vfs* vfs, int us) {
  return REAL->xSleep(REAL, us);
}
int CurrentTime(sqlite3_vfs* vfs, double* out) {
  return REAL->xCurrentTime(REAL, out);
}
int GetLastError(sqlite3_vfs* vfs, int n, char* out) {
  return REAL->xGetLastError(REAL, n, out);
}
int CurrentTimeInt64(sqlite3_vfs* vfs, sqlite3_int64* out) {
  return REAL->xCurrentTimeInt64(REAL, out);
}
#undef REAL

Shim* MakeShim(const char* kind) {
  sqlite3_vfs* real = sqlite3_vfs_find(nullptr);
  if (!real || real->iVersion < 2) return nullptr;
  Shim* s = new Shim();  // registered for the life of the process
  s->real = real;
  s->name = std::string("rpoint-") + kind;
  s->write_point = std::string(kind) + ".write";
  s->sync_point = std::string(kind) + ".sync";
  sqlite3_vfs& v = s->vfs;
  v.iVersion = 2;
  v.szOsFile = int(sizeof(File)) + real->szOsFile;
  v.mxPathname = real->mxPathname;
  v.zName = s->name.c_str();
  v.pAppData = s;
  v.xOpen = Open;
  v.xDelete = Delete;
  v.xAccess = Access;
  v.xFullPathname = FullPathname;
  v.xDlOpen = DlOpen;
  v.xDlError = DlError;
  v.xDlSym = DlSym;
  v.xDlClose = DlClose;
  v.xRandomness = Randomness;
  v.xSleep = Sleep;
  v.xCurrentTime = CurrentTime;
  v.xGetLastError = GetLastError;
  v.xCurrentTimeInt64 = CurrentTimeInt64;
  if (sqlite3_vfs_register(&v, 0) != SQLITE_OK) return nullptr;
  return s;
}

}  // namespace

const char* SqliteVfs(const char* kind) {
  static std::mutex mu;
  static Shim* catalog = nullptr;
  static Shim* metadata = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  bool is_catalog = std::strcmp(kind, "catalog") == 0;
  Shim*& s = is_catalog ? catalog : metadata;
  if (!s) s = MakeShim(is_catalog ? "catalog" : "metadata");
  return s ? s->name.c_str() : nullptr;
}

}  // namespace rpoint::fault
