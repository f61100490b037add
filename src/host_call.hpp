// Private: marks the threads and calls on which the library runs host code
// (event callbacks, log sinks, services and their factories, memory models,
// a service's supports(), timers that may log), so that a call that would
// wait for its own thread (closing or destroying a manager) is refused with
// an error instead of deadlocking or freeing what the caller still uses.
#pragma once

#include "sync.hpp"

namespace taskmgr::detail {

// The default (dynamic) TLS model on purpose: an initial-exec variable puts
// the library's whole TLS block into the static TLS surplus, which a library
// loaded later with dlopen (Python's ctypes) may not find room in.
inline int& host_call_depth() noexcept {
  thread_local int depth = 0;
  return depth;
}

// True on a library thread, or inside a host callback the library called.
inline bool in_host_call() noexcept { return host_call_depth() > 0; }

struct HostCallScope {
  HostCallScope() noexcept { ++host_call_depth(); }
  ~HostCallScope() { --host_call_depth(); }
  HostCallScope(const HostCallScope&) = delete;
  HostCallScope& operator=(const HostCallScope&) = delete;
};

}  // namespace taskmgr::detail

// Where the library is about to call host code (`what` names it): no library
// lock may be held (checked by the analysis for the scheduler lock, and at
// run time in check builds for every lock), and until the end of the
// enclosing block the thread is in a host call (close/destroy refused).
#define TASKMGR_HOST_CALL(what)                 \
  ::taskmgr::detail::assert_no_lock_held(what); \
  ::taskmgr::detail::HostCallScope taskmgr_host_call_scope_ {}
