// Private: Clang thread-safety annotations (-Wthread-safety).
//
// Every mutex-protected field is GUARDED_BY its mutex, and functions say
// what they need held (REQUIRES) or not held (REQUIRES(!x), checked
// transitively with -Wthread-safety-negative). The `tsa` preset builds with
// clang and these warnings as errors; under GCC the macros are empty.
// docs/ARCHITECTURE.md ("Locks") has the lock order.
#pragma once

#if defined(__clang__)
#define TASKMGR_TSA(x) __attribute__((x))
#else
#define TASKMGR_TSA(x)
#endif

#define CAPABILITY(x) TASKMGR_TSA(capability(x))
#define SCOPED_CAPABILITY TASKMGR_TSA(scoped_lockable)
#define GUARDED_BY(x) TASKMGR_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) TASKMGR_TSA(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) TASKMGR_TSA(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) TASKMGR_TSA(acquired_after(__VA_ARGS__))
#define REQUIRES(...) TASKMGR_TSA(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) TASKMGR_TSA(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) TASKMGR_TSA(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) TASKMGR_TSA(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) TASKMGR_TSA(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) TASKMGR_TSA(release_shared_capability(__VA_ARGS__))
#define RELEASE_GENERIC(...) TASKMGR_TSA(release_generic_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) TASKMGR_TSA(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) TASKMGR_TSA(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) TASKMGR_TSA(assert_capability(x))
#define RETURN_CAPABILITY(x) TASKMGR_TSA(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS TASKMGR_TSA(no_thread_safety_analysis)
