#include "taskmgr/error.hpp"

namespace taskmgr {

std::string_view to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kOk: return "ok";
    case ErrorCode::kInvalidArgument: return "invalid_argument";
    case ErrorCode::kNotFound: return "not_found";
    case ErrorCode::kQueueFull: return "queue_full";
    case ErrorCode::kOutOfMemory: return "out_of_memory";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kBusy: return "busy";
    case ErrorCode::kInvalidConfig: return "invalid_config";
    case ErrorCode::kIoError: return "io_error";
    case ErrorCode::kDeviceUnavailable: return "device_unavailable";
    case ErrorCode::kMemoryLimitExceeded: return "memory_limit_exceeded";
    case ErrorCode::kPoolExhausted: return "pool_exhausted";
    case ErrorCode::kInvalidState: return "invalid_state";
    case ErrorCode::kIncompatible: return "incompatible";
    case ErrorCode::kCancelled: return "cancelled";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kUnpersisted: return "unpersisted";
    case ErrorCode::kInternal: return "internal";
  }
  return "unknown";
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error(message), code_(code) {}

Error::~Error() = default;

}  // namespace taskmgr
