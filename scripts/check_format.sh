#!/usr/bin/env bash
# Fails when a tracked C or C++ file is not formatted as .clang-format says
# (clang-format 14, Debian's). `scripts/check_format.sh --fix` formats them.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.c' '*.h' '*.cpp' '*.hpp' | grep -v '^fuzz/corpus/')
if [ "${1:-}" = "--fix" ]; then
  clang-format -i "${files[@]}"
  echo "format: formatted ${#files[@]} files"
  exit 0
fi
if ! clang-format --dry-run --Werror "${files[@]}" 2>/tmp/taskmgr-format.$$; then
  grep -E '^[^ ].*: (error|warning):' /tmp/taskmgr-format.$$ | cut -d: -f1 | sort -u | sed 's/^/  not formatted: /'
  rm -f /tmp/taskmgr-format.$$
  echo "format: run scripts/check_format.sh --fix (clang-format, .clang-format) and commit" >&2
  exit 1
fi
rm -f /tmp/taskmgr-format.$$
echo "format: ${#files[@]} files formatted as .clang-format says"
