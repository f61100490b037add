# Warning and sanitizer settings, applied per target (never globally to deps).

add_library(taskmgr_warnings INTERFACE)
target_compile_options(taskmgr_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wold-style-cast
  -Wcast-align -Woverloaded-virtual -Wnull-dereference -Wformat=2
  $<$<BOOL:${TASKMGR_WERROR}>:-Werror>)
# Clang checks the lock annotations (src/thread_annotations.hpp): fields
# GUARDED_BY their mutex, REQUIRES / REQUIRES(!scheduler) on functions; the
# negative requirements propagate to callers, so host code, store reads and
# file-system calls cannot be reached with the scheduler lock held.
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  target_compile_options(taskmgr_warnings INTERFACE -Wthread-safety -Wthread-safety-negative)
endif()
# C sources (the C ABI test) get the C subset.
add_library(taskmgr_c_warnings INTERFACE)
target_compile_options(taskmgr_c_warnings INTERFACE
  -Wall -Wextra -Wpedantic $<$<BOOL:${TASKMGR_WERROR}>:-Werror>)

if(TASKMGR_SANITIZE)
  add_compile_options(-fsanitize=${TASKMGR_SANITIZE} -fno-omit-frame-pointer -g)
  add_link_options(-fsanitize=${TASKMGR_SANITIZE})
  # GCC 12's -Wmaybe-uninitialized reports false positives inside libstdc++
  # and Boost when sanitizer instrumentation changes inlining; the plain
  # build keeps the warning as an error.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    add_compile_options(-Wno-maybe-uninitialized)
  endif()
  # Boost.Asio's headers use std::atomic_thread_fence, which GCC flags under
  # -fsanitize=thread (-Wtsan); taskmgr's own code uses no fences.
  if(TASKMGR_SANITIZE MATCHES "thread" AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    add_compile_options(-Wno-tsan)
  endif()
  if(TASKMGR_SANITIZE MATCHES "undefined")
    add_compile_options(-fno-sanitize-recover=undefined)
  endif()
endif()

# libFuzzer: everything is built with coverage instrumentation; only the
# harnesses in fuzz/ link libFuzzer's main (clang).
if(TASKMGR_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "TASKMGR_FUZZ needs clang (the fuzz preset sets CC=clang CXX=clang++)")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()
