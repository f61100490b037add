// taskmgr: the one error model of the C++ API.
//
// Every failure a caller can cause or act on is reported as a taskmgr::Error
// (an exception derived from std::runtime_error) that carries an ErrorCode.
// The codes map one-to-one onto the C ABI's TASKMGR_E_* status values
// (capi/taskmgr.h); the numeric values are the C values and never change.
//
// Exceptions from dependencies (SQLite, OpenCV, Tesseract, yaml-cpp) are
// caught at the library boundary and rethrown as Error with the original
// message kept in what(). A failure *inside a task* never throws out of the
// API: it becomes the task's TaskFailureReason and failure message.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

#include "taskmgr/export.hpp"

namespace taskmgr {

// Stable numeric values: they are the C ABI's status codes.
enum class ErrorCode : int {
  kOk = 0,
  kInvalidArgument = -1,       // a parameter is malformed or out of range
  kNotFound = -2,              // unknown task id, device, service or file
  kQueueFull = -3,             // tasks.max_queue_size reached; nothing was queued
  kOutOfMemory = -4,           // allocation failed or no device memory
  kTimeout = -5,               // a wait or acquire ran past its deadline
  kBusy = -6,                  // the resource is in use (e.g. database held)
  kInvalidConfig = -7,         // configuration failed validation
  kIoError = -8,               // file system or database I/O failed
  kDeviceUnavailable = -9,     // no device can hold the task
  kMemoryLimitExceeded = -10,  // estimate exceeds the configured per-task limit
  kPoolExhausted = -11,        // no service instance became free in time
  kInvalidState = -12,         // the call is not allowed in the task's state
  kIncompatible = -13,         // version or schema mismatch
  kCancelled = -14,            // the operation was cancelled
  kUnsupported = -15,          // the feature is not available in this build
  kUnpersisted = -16,          // close(): writes accepted earlier are not in the store
  kInternal = -99,             // a bug in taskmgr: please report it
};

// "invalid_argument", "not_found", ... (stable; used in JSON and logs).
TASKMGR_API std::string_view to_string(ErrorCode code) noexcept;

class TASKMGR_API Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ~Error() override;
  Error(const Error&) = default;
  Error& operator=(const Error&) = default;

  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace taskmgr
