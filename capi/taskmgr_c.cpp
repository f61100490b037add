// The extern "C" facade. Every body runs inside capi::guarded().
#include "taskmgr.h"

#include <cstdlib>
#include <cstring>

#include "guard.hpp"
#include "taskmgr/taskmgr.hpp"  // also defines TASKMGR_VERSION_*: must match taskmgr.h

static_assert(TASKMGR_OK == static_cast<int>(taskmgr::ErrorCode::kOk));
static_assert(TASKMGR_E_INVALID_ARGUMENT == static_cast<int>(taskmgr::ErrorCode::kInvalidArgument));
static_assert(TASKMGR_E_NOT_FOUND == static_cast<int>(taskmgr::ErrorCode::kNotFound));
static_assert(TASKMGR_E_QUEUE_FULL == static_cast<int>(taskmgr::ErrorCode::kQueueFull));
static_assert(TASKMGR_E_OUT_OF_MEMORY == static_cast<int>(taskmgr::ErrorCode::kOutOfMemory));
static_assert(TASKMGR_E_TIMEOUT == static_cast<int>(taskmgr::ErrorCode::kTimeout));
static_assert(TASKMGR_E_BUSY == static_cast<int>(taskmgr::ErrorCode::kBusy));
static_assert(TASKMGR_E_INVALID_CONFIG == static_cast<int>(taskmgr::ErrorCode::kInvalidConfig));
static_assert(TASKMGR_E_IO == static_cast<int>(taskmgr::ErrorCode::kIoError));
static_assert(TASKMGR_E_DEVICE_UNAVAILABLE ==
              static_cast<int>(taskmgr::ErrorCode::kDeviceUnavailable));
static_assert(TASKMGR_E_MEMORY_LIMIT_EXCEEDED ==
              static_cast<int>(taskmgr::ErrorCode::kMemoryLimitExceeded));
static_assert(TASKMGR_E_POOL_EXHAUSTED == static_cast<int>(taskmgr::ErrorCode::kPoolExhausted));
static_assert(TASKMGR_E_INVALID_STATE == static_cast<int>(taskmgr::ErrorCode::kInvalidState));
static_assert(TASKMGR_E_INCOMPATIBLE == static_cast<int>(taskmgr::ErrorCode::kIncompatible));
static_assert(TASKMGR_E_CANCELLED == static_cast<int>(taskmgr::ErrorCode::kCancelled));
static_assert(TASKMGR_E_UNSUPPORTED == static_cast<int>(taskmgr::ErrorCode::kUnsupported));
static_assert(TASKMGR_E_INTERNAL == static_cast<int>(taskmgr::ErrorCode::kInternal));

namespace taskmgr::capi {

std::string& last_error() {
  thread_local std::string message;
  return message;
}

int fail(int status, std::string message) {
  last_error() = std::move(message);
  return status;
}

char* dup_string(const std::string& s) {
  auto* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p == nullptr) throw std::bad_alloc();
  std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

}  // namespace taskmgr::capi

using taskmgr::capi::fail;
using taskmgr::capi::guarded;

extern "C" {

const char* taskmgr_version_string(void) { return TASKMGR_VERSION_STRING; }

int taskmgr_version_number(void) { return TASKMGR_VERSION_NUMBER; }

const char* taskmgr_status_name(int status) {
  // to_string returns views of string literals: NUL-terminated, static.
  return taskmgr::to_string(static_cast<taskmgr::ErrorCode>(status)).data();
}

const char* taskmgr_last_error(void) { return taskmgr::capi::last_error().c_str(); }

void taskmgr_free(void* ptr) { std::free(ptr); }

int taskmgr_config_normalize(const char* yaml, char** out_yaml) {
  return guarded([&]() -> int {
    if (out_yaml == nullptr) {
      return fail(TASKMGR_E_INVALID_ARGUMENT, "taskmgr_config_normalize: out_yaml is NULL");
    }
    *out_yaml = nullptr;
    const taskmgr::Config c = (yaml == nullptr || *yaml == '\0')
                                  ? taskmgr::Config::defaults()
                                  : taskmgr::Config::from_yaml_string(yaml);
    *out_yaml = taskmgr::capi::dup_string(c.to_yaml());
    return TASKMGR_OK;
  });
}

int taskmgr_config_normalize_file(const char* path, char** out_yaml) {
  return guarded([&]() -> int {
    if (out_yaml == nullptr) {
      return fail(TASKMGR_E_INVALID_ARGUMENT, "taskmgr_config_normalize_file: out_yaml is NULL");
    }
    *out_yaml = nullptr;
    if (path == nullptr) {
      return fail(TASKMGR_E_INVALID_ARGUMENT, "taskmgr_config_normalize_file: path is NULL");
    }
    const taskmgr::Config c = taskmgr::Config::from_yaml_file(path);
    *out_yaml = taskmgr::capi::dup_string(c.to_yaml());
    return TASKMGR_OK;
  });
}

}  // extern "C"
