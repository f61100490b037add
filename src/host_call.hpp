// Private: marks the threads and calls on which the library runs host code
// (event callbacks, log sinks, services, timers that may log), so that a
// call that would wait for its own thread (closing or destroying a manager)
// is refused with an error instead of deadlocking.
#pragma once

namespace taskmgr::detail {

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
