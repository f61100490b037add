#!/usr/bin/env bash
# README command 2: set up, build and run the whole test suite: the dev build
# (with a short soak), then again under AddressSanitizer+UBSan and under
# ThreadSanitizer (with the concurrency stress test), then each libFuzzer
# harness for a fixed time (scripts/fuzz.sh).
# TASKMGR_TEST_PRESETS="dev" limits the presets (default: "dev asan tsan");
# TASKMGR_FUZZ_SECONDS sets each fuzzer's time (default 60; 0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
presets=${TASKMGR_TEST_PRESETS:-dev asan tsan}
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
