// Private to the C ABI: the one catch-all every extern "C" entry point runs
// in, and the thread-local last-error message.
#pragma once

#include <new>
#include <string>
#include <utility>

#include "taskmgr/error.hpp"

namespace taskmgr::capi {

// The thread's last error message (taskmgr_last_error()).
std::string& last_error();

// Sets the message and returns the status, for argument checks.
int fail(int status, std::string message);

// Runs `body` (returning void or int status) with the last error cleared;
// turns every exception into a status code and a message.
template <typename F>
int guarded(F&& body) noexcept {
  try {
    last_error().clear();
    if constexpr (std::is_void_v<decltype(body())>) {
      std::forward<F>(body)();
      return 0;
    } else {
      return std::forward<F>(body)();
    }
  } catch (const Error& e) {
    return fail(static_cast<int>(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    return fail(static_cast<int>(ErrorCode::kOutOfMemory), "out of memory");
  } catch (const std::exception& e) {
    return fail(static_cast<int>(ErrorCode::kInternal), std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(static_cast<int>(ErrorCode::kInternal), "internal error: unknown exception");
  }
}

// A malloc'ed copy of s, for strings handed to the caller (taskmgr_free).
char* dup_string(const std::string& s);

}  // namespace taskmgr::capi
