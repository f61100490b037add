#!/usr/bin/env bash
# README command 2: set up, build and run the whole test suite: the dev build
# (with a short soak), the same with clang and its thread-safety analysis as
# errors (tsa: -Wthread-safety -Wthread-safety-negative -Werror), then under
# AddressSanitizer+UBSan and under ThreadSanitizer (with the concurrency
# stress test), then each libFuzzer harness for a fixed time
# (scripts/fuzz.sh). Before any of it, the whole tree must be formatted as
# .clang-format says (scripts/check_format.sh).
# TASKMGR_TEST_PRESETS="dev" limits the presets (default: "dev tsa asan tsan");
# TASKMGR_FUZZ_SECONDS sets each fuzzer's time (default 60; 0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check_format.sh
presets=${TASKMGR_TEST_PRESETS:-dev tsa asan tsan}
for p in $presets; do
  echo "=== preset $p: configure, build, test ==="
  cmake --preset "$p" >/dev/null
  cmake --build --preset "$p"
  ctest --preset "$p"
done
fuzz_seconds=${TASKMGR_FUZZ_SECONDS:-60}
if [ "$fuzz_seconds" -gt 0 ]; then
  echo "=== fuzz: each harness for ${fuzz_seconds} s ==="
  bash scripts/fuzz.sh "$fuzz_seconds"
fi
echo "=== all passed: presets $presets, fuzzers ${fuzz_seconds} s each ==="
