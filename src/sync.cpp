#include "sync.hpp"

#include <cstdio>
#include <cstdlib>

namespace taskmgr::detail {

#if defined(TASKMGR_INTERNAL_CHECKS)
void scheduler_lock_violation(const char* what) noexcept {
  std::fprintf(stderr,
               "taskmgr: %s was reached with a library lock held (host code, store reads "
               "and file-system calls never run under one); aborting\n",
               what);
  std::abort();
}
#endif

}  // namespace taskmgr::detail
