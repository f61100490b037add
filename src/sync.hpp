// Private: the mutex types of the library, which the thread-safety analysis
// knows (thread_annotations.hpp).
//
//  * Mutex / MutexLock: a std::mutex and its scoped lock (relockable; the
//    std::unique_lock inside serves condition-variable waits).
//  * SharedMutex / ReaderLock / WriterLock: a std::shared_mutex.
//  * The scheduler lock. Each manager has one SchedulerMutex; to the
//    analysis every one of them is the single role `scheduler_lock`, so that any
//    class, not only the one owning the mutex, can say what it needs:
//    REQUIRES(scheduler_lock) for code that reads or writes scheduling state,
//    REQUIRES(!scheduler_lock) for code that calls host code (log sinks, event
//    callbacks, services, factories, memory models), reads a store that may
//    wait, or touches the file system. With -Wthread-safety-negative the
//    negative requirement propagates to every caller, so calling such code
//    with the lock held does not compile.
//
// Builds with TASKMGR_INTERNAL_CHECKS (every build type but Release) also check
// at run time: a thread that holds a scheduler lock and reaches a host call
// or an API entry aborts with a message naming it.
#pragma once

#include <condition_variable>
#include <mutex>
#include <shared_mutex>

#include "spin_lock.hpp"
#include "thread_annotations.hpp"

namespace taskmgr::detail {

// Check builds count, per thread, the library locks (Mutex, SharedMutex and
// their scoped locks) it holds: host code must find none (host_call.hpp).
#if defined(TASKMGR_INTERNAL_CHECKS)
inline int& library_lock_depth() noexcept {
  thread_local int depth = 0;
  return depth;
}
inline void count_lock() noexcept { ++library_lock_depth(); }
inline void count_unlock() noexcept { --library_lock_depth(); }
#else
inline void count_lock() noexcept {}
inline void count_unlock() noexcept {}
#endif

class CAPABILITY("mutex") Mutex {
 public:
  void lock() ACQUIRE() {
    m_.lock();
    count_lock();
  }
  // Spins briefly before blocking (spin_lock.hpp): for short, hot sections.
  void lock_spin() ACQUIRE() {
    lock_with_spin(m_);
    count_lock();
  }
  bool try_lock() TRY_ACQUIRE(true) {
    if (!m_.try_lock()) return false;
    count_lock();
    return true;
  }
  void unlock() RELEASE() {
    count_unlock();
    m_.unlock();
  }
  std::mutex& native() noexcept { return m_; }
  // For REQUIRES(!mu): with -Wthread-safety-negative, a member function that
  // takes its own class's mutex must require that the caller does not hold it.
  const Mutex& operator!() const noexcept { return *this; }

 private:
  std::mutex m_;
};

// A scoped lock of a Mutex; may be unlocked and locked again.
class SCOPED_CAPABILITY MutexLock {
 public:
  struct Spin {};
  explicit MutexLock(Mutex& m) ACQUIRE(m) : lk_(m.native()) { count_lock(); }
  MutexLock(Mutex& m, Spin) ACQUIRE(m) : lk_(m.native(), std::defer_lock) {
    lock_with_spin(m.native());
    lk_ = std::unique_lock<std::mutex>(m.native(), std::adopt_lock);
    count_lock();
  }
  // Locks only when `take` (e.g. when there is something to protect).
  MutexLock(Mutex& m, bool take) ACQUIRE(m) : lk_(m.native(), std::defer_lock) {
    if (take) {
      lk_.lock();
      count_lock();
    }
  }
  ~MutexLock() RELEASE() {
    if (lk_.owns_lock()) count_unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void unlock() RELEASE() {
    if (!lk_.owns_lock()) return;  // a conditional lock may not have been taken
    count_unlock();
    lk_.unlock();
  }
  void lock() ACQUIRE() {
    lk_.lock();
    count_lock();
  }
  bool owns_lock() const noexcept { return lk_.owns_lock(); }
  // For std::condition_variable waits (which unlock and lock again).
  std::unique_lock<std::mutex>& native() noexcept { return lk_; }

 private:
  std::unique_lock<std::mutex> lk_;
};

class CAPABILITY("shared mutex") SharedMutex {
 public:
  void lock() ACQUIRE() {
    m_.lock();
    count_lock();
  }
  void unlock() RELEASE() {
    count_unlock();
    m_.unlock();
  }
  void lock_shared() ACQUIRE_SHARED() {
    m_.lock_shared();
    count_lock();
  }
  void unlock_shared() RELEASE_SHARED() {
    count_unlock();
    m_.unlock_shared();
  }
  // For REQUIRES(!mu), as Mutex's.
  const SharedMutex& operator!() const noexcept { return *this; }

 private:
  std::shared_mutex m_;
};

class SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& m) ACQUIRE_SHARED(m) : m_(m) { m_.lock_shared(); }
  ~ReaderLock() RELEASE() { m_.unlock_shared(); }
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

 private:
  SharedMutex& m_;
};

class SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& m) ACQUIRE(m) : m_(m) { m_.lock(); }
  ~WriterLock() RELEASE() { m_.unlock(); }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

 private:
  SharedMutex& m_;
};

// ---- the scheduler lock -------------------------------------------------------

// The role every manager's scheduler lock plays for the analysis.
class CAPABILITY("scheduler lock") SchedulerRole {
 public:
  // For REQUIRES(!scheduler_lock).
  const SchedulerRole& operator!() const noexcept { return *this; }
};
inline SchedulerRole scheduler_lock;

#if defined(TASKMGR_INTERNAL_CHECKS)
// Scheduler locks the calling thread holds (run-time check builds only).
inline int& scheduler_depth() noexcept {
  thread_local int depth = 0;
  return depth;
}
[[noreturn]] void scheduler_lock_violation(const char* what) noexcept;
#endif

// For the analysis and (in check builds) at run time: the calling thread
// holds no scheduler lock. Called at API entries. `what` names the call in
// the abort message.
inline void assert_scheduler_not_held(const char* what) ASSERT_CAPABILITY(!scheduler_lock) {
#if defined(TASKMGR_INTERNAL_CHECKS)
  if (scheduler_depth() != 0) scheduler_lock_violation(what);
#else
  (void)what;
#endif
}

// The same, and (in check builds) no library lock at all: where host code
// is about to run (host_call.hpp).
inline void assert_no_lock_held(const char* what) ASSERT_CAPABILITY(!scheduler_lock) {
#if defined(TASKMGR_INTERNAL_CHECKS)
  if (scheduler_depth() != 0 || library_lock_depth() != 0) scheduler_lock_violation(what);
#else
  (void)what;
#endif
}

class SchedulerMutex {
 public:
  void lock() ACQUIRE(scheduler_lock) NO_THREAD_SAFETY_ANALYSIS {
    lock_with_spin(m_);
    on_lock();
  }
  void unlock() RELEASE(scheduler_lock) NO_THREAD_SAFETY_ANALYSIS {
    on_unlock();
    m_.unlock();
  }
  std::mutex& native() noexcept { return m_; }

  static void on_lock() noexcept {
#if defined(TASKMGR_INTERNAL_CHECKS)
    ++scheduler_depth();
#endif
  }
  static void on_unlock() noexcept {
#if defined(TASKMGR_INTERNAL_CHECKS)
    --scheduler_depth();
#endif
  }

 private:
  std::mutex m_;
};

// A scoped scheduler lock; may be unlocked and locked again, and waits on a
// condition variable through wait_with().
class SCOPED_CAPABILITY SchedulerLock {
 public:
  explicit SchedulerLock(SchedulerMutex& m) ACQUIRE(scheduler_lock) NO_THREAD_SAFETY_ANALYSIS
      : m_(&m) {
    m.lock();
    held_ = true;
  }
  ~SchedulerLock() RELEASE() NO_THREAD_SAFETY_ANALYSIS {
    if (held_) m_->unlock();
  }
  SchedulerLock(const SchedulerLock&) = delete;
  SchedulerLock& operator=(const SchedulerLock&) = delete;

  void unlock() RELEASE() NO_THREAD_SAFETY_ANALYSIS {
    m_->unlock();
    held_ = false;
  }
  void lock() ACQUIRE() NO_THREAD_SAFETY_ANALYSIS {
    m_->lock();
    held_ = true;
  }

  // Runs `wait(std::unique_lock<std::mutex>&)` (a condition-variable wait,
  // which unlocks and locks again); the lock is held before and after.
  template <typename Wait>
  auto wait_with(Wait&& wait) NO_THREAD_SAFETY_ANALYSIS {
    std::unique_lock<std::mutex> lk(m_->native(), std::adopt_lock);
    SchedulerMutex::on_unlock();
    struct Relock {
      std::unique_lock<std::mutex>& lk;
      ~Relock() {
        lk.release();
        SchedulerMutex::on_lock();
      }
    } relock{lk};
    return wait(lk);
  }

 private:
  SchedulerMutex* m_;
  bool held_ = false;
};

// The opposite of SchedulerLock: releases the (held) scheduler lock for the
// scope and takes it again at its end, also when the scope is left by an
// exception. (Clang's convention for a scoped unlock: the destructor is
// annotated RELEASE(), meaning "ends the scope", and the analysis knows the
// lock is held again after it.)
class SCOPED_CAPABILITY SchedulerUnlock {
 public:
  explicit SchedulerUnlock(SchedulerMutex& m) RELEASE(scheduler_lock) NO_THREAD_SAFETY_ANALYSIS
      : m_(&m) {
    m.unlock();
  }
  ~SchedulerUnlock() RELEASE() NO_THREAD_SAFETY_ANALYSIS { m_->lock(); }
  SchedulerUnlock(const SchedulerUnlock&) = delete;
  SchedulerUnlock& operator=(const SchedulerUnlock&) = delete;

 private:
  SchedulerMutex* m_;
};

}  // namespace taskmgr::detail
