// Status and Result<T>: the error values that cross module borders.
//
// Modules never throw across their public interfaces; they return a Status
// (or Result<T>) whose Code maps one-to-one onto each edge's error vocabulary:
// NBD errno values (nbd/), HTTP status + error.code (control/), CLI exit codes.
// Thread-safety: plain values, safe to copy between threads.
#pragma once

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace rpoint {

enum class Code {
  kOk = 0,
  kInvalidArgument,    // bad input from a client: HTTP 400, NBD EINVAL
  kNotFound,           // HTTP 404
  kAlreadyExists,      // HTTP 409
  kConflict,           // resource busy / in use: HTTP 409
  kOutOfRange,         // offset/length beyond the disk: NBD EINVAL (or ENOSPC on write)
  kNoSpace,            // ENOSPC from the backing store: HTTP 507, NBD ENOSPC
  kPermissionDenied,   // read-only export, EPERM: HTTP 403
  kUnsupported,        // HTTP 501 / 400, NBD ENOTSUP
  kIoError,            // EIO and friends: HTTP 500, NBD EIO
  kCorruption,         // a database file fails its own checks (SQLite: malformed): HTTP 500
  kShutdown,           // daemon stopping: NBD ESHUTDOWN, HTTP 503
  kInternal,           // a bug: HTTP 500
  kUnavailable,        // a resource this needs is missing for now (a region's store): HTTP 503
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {Code::kAlreadyExists, std::move(m)}; }
  static Status Conflict(std::string m) { return {Code::kConflict, std::move(m)}; }
  static Status OutOfRange(std::string m) { return {Code::kOutOfRange, std::move(m)}; }
  static Status NoSpace(std::string m) { return {Code::kNoSpace, std::move(m)}; }
  static Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
  static Status Unsupported(std::string m) { return {Code::kUnsupported, std::move(m)}; }
  static Status IoError(std::string m) { return {Code::kIoError, std::move(m)}; }
  static Status Corruption(std::string m) { return {Code::kCorruption, std::move(m)}; }
  static Status Shutdown(std::string m) { return {Code::kShutdown, std::move(m)}; }
  static Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
  static Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }
  // Maps a positive errno value (as from errno or -cqe->res) to a Status.
  static Status FromErrno(int err, const std::string& context);

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // Short machine-readable name of the code, e.g. "NotFound" (used as JSON error.code).
  const char* code_name() const;
  std::string ToString() const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

// Either a value or a non-ok Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}                 // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) { assert(!std::get<Status>(v_).ok()); }  // NOLINT

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace rpoint
