#!/usr/bin/env bash
# Lists the dynamic symbols libtaskmgr.so defines and fails on any that is not
# part of the API: C functions must be named taskmgr_* and declared in
# capi/taskmgr.h (and every declared one must be exported); C++ symbols must
# be in namespace taskmgr (no leaked std::, boost::, fmt::, YAML:: ...).
set -euo pipefail
lib="$1"
header="$2"

defined=$(nm -D --defined-only "$lib" | awk '{print $3}' | sort -u)
bad=0

# C symbols: not mangled.
c_syms=$(printf '%s\n' "$defined" | grep -v '^_Z' | grep -vE '^(_init|_fini|_edata|_end|__bss_start)$' || true)
declared=$(grep -oE '\btaskmgr_[a-z0-9_]+\s*\(' "$header" | sed -E 's/\s*\($//' | sort -u)
for s in $c_syms; do
  # Here-strings, not pipes: with pipefail, grep -q quitting early would
  # kill printf with SIGPIPE and fail the check at random.
  if ! grep -qx -- "$s" <<< "$declared"; then
    echo "exported C symbol not declared in taskmgr.h: $s"; bad=1
  fi
done
for s in $declared; do
  if ! grep -qx -- "$s" <<< "$c_syms"; then
    echo "declared in taskmgr.h but not exported: $s"; bad=1
  fi
done

# C++ symbols: demangle and require namespace taskmgr.
cxx=$(printf '%s\n' "$defined" | grep '^_Z' | c++filt || true)
while IFS= read -r s; do
  [ -z "$s" ] && continue
  case "$s" in
    taskmgr::*|"typeinfo for taskmgr::"*|"typeinfo name for taskmgr::"*|"vtable for taskmgr::"*|\
    "non-virtual thunk to taskmgr::"*|"virtual thunk to taskmgr::"*) ;;
    *) echo "exported symbol outside namespace taskmgr: $s"; bad=1 ;;
  esac
done <<< "$cxx"

# A library loaded with dlopen (Python's ctypes) must not need the static TLS
# surplus: an initial-exec thread_local sets DF_STATIC_TLS and dlopen may then
# fail with "cannot allocate memory in static TLS block".
if readelf -d "$lib" | grep 'STATIC_TLS' > /dev/null; then  # (grep -q could SIGPIPE readelf)
  echo "libtaskmgr is marked STATIC_TLS (an initial-exec thread_local?): dlopen may fail"
  bad=1
fi

n_c=$(printf '%s\n' "$c_syms" | grep -c . || true)
n_cxx=$(printf '%s\n' "$cxx" | grep -c . || true)
if [ "$bad" -ne 0 ]; then
  echo "FAILED: libtaskmgr exports symbols outside its API (or needs static TLS)"
  exit 1
fi
if [ "$n_c" -lt 1 ] || [ "$n_cxx" -lt 1 ]; then
  echo "FAILED: expected both C and C++ API symbols, found $n_c C and $n_cxx C++"
  exit 1
fi
echo "exported symbols ok: $n_c C functions, $n_cxx C++ symbols, all in the API"
