// Private to the C ABI: the one catch-all every extern "C" entry point runs
// in, and the thread-local last-error message.
#pragma once

#include <new>
#include <string>
#include <utility>

#include "forced_unwind.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr::capi {

// The thread's last error message (taskmgr_last_error()).
std::string& last_error();

// Sets the message and returns the status, for argument checks.
int fail(int status, std::string message);

// Runs `body` (returning void or int status) with the last error cleared;
// turns every exception into a status code and a message, but a forced
// unwind: a thread that ends inside a call (pthread_exit or cancellation in
// a callback, as Python's finalization does) unwinds through it, as the
// runtime requires ("FATAL: exception not rethrown" otherwise).
template <typename F>
int guarded(F&& body) {
  try {
    last_error().clear();
    int status = 0;
    if constexpr (std::is_void_v<decltype(body())>) {
      std::forward<F>(body)();
    } else {
      status = std::forward<F>(body)();
    }
    // A failure of a call a callback made inside this one does not outlive
    // this call's success: "" after every successful call.
    if (status == 0) last_error().clear();
    return status;
  } catch (const Error& e) {
    return fail(static_cast<int>(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    return fail(static_cast<int>(ErrorCode::kOutOfMemory), "out of memory");
  } catch (const std::exception& e) {
    return fail(static_cast<int>(ErrorCode::kInternal), std::string("internal error: ") + e.what());
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    return fail(static_cast<int>(ErrorCode::kInternal), "internal error: unknown exception");
  }
}

// A malloc'ed copy of s, for strings handed to the caller (taskmgr_free).
char* dup_string(const std::string& s);

}  // namespace taskmgr::capi
