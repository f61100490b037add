#!/usr/bin/env bash
# README command 2: set up, build and run the whole test suite: the dev build,
# then again under AddressSanitizer+UBSan and under ThreadSanitizer.
# TASKMGR_TEST_PRESETS="dev" limits the presets (default: "dev asan tsan").
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
echo "=== all presets passed: $presets ==="
