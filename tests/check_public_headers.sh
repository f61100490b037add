#!/usr/bin/env bash
# Every public header must compile on its own, and none may pull in a
# third-party header (SQLite, SQLiteCpp, OpenCV, Tesseract, Leptonica,
# yaml-cpp, Boost, fmt): hosts compile against taskmgr with the C++ standard
# library only. The compiler's dependency list (-M) shows every file a header
# reaches, system paths included, so a forbidden include anywhere fails.
set -euo pipefail
cxx="$1"; inc="$2"; geninc="$3"; capi="$4"; cc="${5:-cc}"
forbidden='sqlite3|SQLiteCpp|opencv|tesseract|leptonica|/allheaders\.h|yaml-cpp|/boost/|/fmt/'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
n=0; bad=0
for h in "$inc"/taskmgr/*.hpp "$capi"/taskmgr.h; do
  rel=${h#"$inc"/}; [ "$h" = "$capi/taskmgr.h" ] && rel=taskmgr.h
  printf '#include "%s"\n#include "%s"\n' "$rel" "$rel" > "$work/tu.cpp"  # twice: include guards
  if ! "$cxx" -std=c++17 -Wall -Wextra -Werror -fsyntax-only -I"$inc" -I"$geninc" -I"$capi" "$work/tu.cpp"; then
    echo "FAILED: $rel does not compile on its own"; bad=1; continue
  fi
  deps=$("$cxx" -std=c++17 -M -I"$inc" -I"$geninc" -I"$capi" "$work/tu.cpp" | tr ' \\' '\n\n' | grep -E "$forbidden" || true)
  if [ -n "$deps" ]; then
    echo "FAILED: $rel reaches third-party headers:"; echo "$deps"; bad=1
  fi
  n=$((n + 1))
done
# The C header compiles as C89 and C99 from the source tree alone (only its
# own directory on the include path) and reaches no C++ header.
printf '#include "taskmgr.h"\n#include "taskmgr.h"\nint f(void);\nint f(void) { return TASKMGR_OK; }\n' \
  > "$work/tu.c"
for std in c89 c99; do
  if ! "$cc" -std=$std -pedantic-errors -Wall -Wextra -Werror -fsyntax-only -I"$capi" "$work/tu.c"; then
    echo "FAILED: taskmgr.h does not compile as $std with only $capi on the include path"; bad=1
  fi
done
deps=$("$cc" -std=c99 -M -I"$capi" "$work/tu.c" | tr ' \\' '\n\n' | grep -E '\.(hpp|hh|hxx)$|/c\+\+/' || true)
if [ -n "$deps" ]; then
  echo "FAILED: taskmgr.h reaches C++ headers:"; echo "$deps"; bad=1
fi
[ "$bad" -eq 0 ] || exit 1
[ "$n" -gt 0 ] || { echo "FAILED: no headers found"; exit 1; }
echo "public headers ok: $n headers compile alone and include no third-party header"
