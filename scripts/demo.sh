#!/usr/bin/env bash
# README command 1: set up, build (release preset) and run the main program.
# With no arguments: it renders the sample pages into ./samples (if absent)
# and OCRs them through the library, with the task database in
# ./taskmgr.db; then it puts two of those pages into an image-only PDF
# (./samples-pdf/letter-and-notes.pdf, the way a scanner would) and makes a
# searchable PDF of it (./searchable/letter-and-notes.pdf, with the text
# beside it as .txt). Running it again redoes nothing. With arguments, they
# are passed to taskmgr-ocr (e.g. files or folders to OCR instead).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release >/dev/null
# Only what the demo runs.
cmake --build --preset release --target taskmgr-ocr taskmgr-img2pdf
ocr=./build/release/examples/taskmgr_ocr/taskmgr-ocr
if [ "$#" -gt 0 ]; then exec "$ocr" "$@"; fi
"$ocr"
mkdir -p samples-pdf
if [ ! -f samples-pdf/letter-and-notes.pdf ]; then
  ./build/release/tools/taskmgr-img2pdf samples-pdf/letter-and-notes.pdf \
    samples/letter.tif samples/notes.tif
  echo "made samples-pdf/letter-and-notes.pdf: two scanned pages, no text layer"
fi
echo
"$ocr" --format pdf --sidecar --out searchable samples-pdf
echo
echo "searchable PDF: searchable/letter-and-notes.pdf (its text: searchable/letter-and-notes.txt)"
