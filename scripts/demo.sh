#!/usr/bin/env bash
# README command 1: set up, build (release preset) and run the main program.
# Extra arguments are passed to taskmgr-ocr.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release
exec ./build/release/examples/taskmgr_ocr/taskmgr-ocr "$@"
