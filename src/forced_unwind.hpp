// Private: a thread that is cancelled or exits (pthread_exit) unwinds with
// abi::__forced_unwind, which a catch (...) must never swallow (glibc then
// aborts: "exception not rethrown"). Every catch (...) on a library thread
// starts with rethrow_if_forced_unwind().
#pragma once

#include <cxxabi.h>

namespace taskmgr::detail {

// Inside a catch (...) handler: rethrows a forced unwind, does nothing for
// any other exception (the handler goes on with it). Binding the forced
// unwind's (null) exception object to the reference below is what UBSan's
// null check flags in every catch of it: checked off here, in one place.
__attribute__((no_sanitize("null"))) inline void rethrow_if_forced_unwind() {
  try {
    throw;
  } catch (const abi::__forced_unwind&) {
    throw;
  } catch (...) {
  }
}

}  // namespace taskmgr::detail
