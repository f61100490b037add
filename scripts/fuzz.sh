#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz preset: clang, ASan + UBSan) and runs
# each for SECONDS (default 60) from its seed corpus (fuzz/corpus/). A crash,
# leak or timeout fails the run; its input is saved under build/fuzz/artifacts/
# (turn it into a regression input in fuzz/regressions/<harness>/).
#   bash scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz
mkdir -p build/fuzz/artifacts
# Leaks inside system libraries we cannot fix (each explained in the file).
export LSAN_OPTIONS="suppressions=$PWD/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
# ocr_worker: fuzz_ocr_input again, through a worker process (the
# taskmgr-worker of the same build; the worker-process path of issue 18).
for h in config ocr_input ocr_worker capi; do
  bin=$h
  export TASKMGR_FUZZ_WORKER=
  if [ "$h" = ocr_worker ]; then
    bin=ocr_input
    export TASKMGR_FUZZ_WORKER=$PWD/build/fuzz/src/taskmgr-worker
  fi
  work=$(mktemp -d)
  # Regressions first: every input that once crashed must pass.
  if [ -d "fuzz/regressions/$bin" ] && [ -n "$(ls -A "fuzz/regressions/$bin")" ]; then
    ./build/fuzz/fuzz/fuzz_$bin -runs=1 fuzz/regressions/$bin/*
  fi
  echo "--- fuzz_$h: ${seconds} s"
  status=0
  # fuzz_capi keeps one manager across inputs, so every input leaves memory
  # behind and a per-input leak scan (LSan over the whole heap) would run on
  # each: it is checked once, when the process exits, instead.
  leaks=1
  [ "$h" = capi ] && leaks=0
  ./build/fuzz/fuzz/fuzz_$bin "$work" "fuzz/corpus/$bin" -max_total_time="$seconds" \
    -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 -detect_leaks=$leaks \
    -artifact_prefix="build/fuzz/artifacts/$h-" > "$work.log" 2>&1 || status=$?
  grep -E "^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|ERROR|SUMMARY" "$work.log" || true
  if [ "$status" -ne 0 ]; then tail -40 "$work.log"; fi
  rm -f "$work.log"
  rm -rf "$work"
  if [ "$status" -ne 0 ]; then
    echo "fuzz_$h FAILED (exit $status); input saved under build/fuzz/artifacts/"
    exit 1
  fi
done
echo "fuzz: all harnesses ran ${seconds} s with no finding"
