#!/usr/bin/env bash
# README command 1: set up, build (release preset) and run the main program:
# it renders the sample pages into ./samples (if absent) and OCRs them through
# the library, with the task database in ./taskmgr.db. Extra arguments are
# passed to taskmgr-ocr (e.g. files or folders to OCR instead).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target taskmgr-ocr   # only what the demo runs
exec ./build/release/examples/taskmgr_ocr/taskmgr-ocr "$@"
