// A SQLite VFS shim that puts SQLite's own file I/O under fault injection:
// xWrite consults "<kind>.write" and xSync "<kind>.sync" (fault_injection.h),
// so an armed rule makes SQLite see a real I/O error (SQLITE_IOERR_WRITE,
// SQLITE_IOERR_FSYNC, SQLITE_FULL for ENOSPC/EDQUOT) and roll back the way it
// would on a failing disk. Everything else is passed to the default VFS.
//
// Thread-safety: registration happens once (std::call_once); the shim's file
// methods are as thread-safe as the wrapped VFS's.
#pragma once

namespace rpoint::fault {

// The name of the VFS to pass to sqlite3_open_v2 for a database of `kind`:
// "catalog" (the store's store.db) or "metadata" (the control plane's db).
// Registers it on first use; nullptr (the default VFS) if that fails.
const char* SqliteVfs(const char* kind);

}  // namespace rpoint::fault
