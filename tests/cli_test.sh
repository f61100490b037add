#!/usr/bin/env bash
# taskmgr-ocr end to end: a folder with good pages, a corrupt file and a
# non-image. Good pages are read (CER reported from .gt.txt), bad files are
# reported with their reasons, the exit code is 1; a second run on the same
# database does not OCR the finished pages again.
set -euo pipefail
bin="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$bin" --samples pages > first.txt || { echo "rendering samples failed"; cat first.txt; exit 1; }
grep -q "CER 0.00%" first.txt || { echo "expected exact sample pages"; cat first.txt; exit 1; }
head -c 300 pages/letter.tif > pages/corrupt.tif
echo "just text" > pages/readme.md
set +e
"$bin" --db run.db --out out pages > second.txt
rc=$?
set -e
cat second.txt
[ "$rc" -eq 1 ] || { echo "exit code $rc, expected 1"; exit 1; }
grep -q "FAILED pages/corrupt.tif: invalid_input" second.txt || { echo "corrupt file not reported"; exit 1; }
grep -q "FAILED pages/readme.md: invalid_input" second.txt || { echo "non-image not reported"; exit 1; }
grep -Eq "pages/letter.tif CER 0\.[0-9][0-9]%" second.txt || { echo "good page not read"; exit 1; }
grep -q "Dear reader" out/letter.txt || { echo "no output file"; exit 1; }
set +e
"$bin" --db run.db pages > third.txt
set -e
grep -q "3 page(s) already done" third.txt || { echo "finished pages were redone"; cat third.txt; exit 1; }
grep -q "pages/letter.tif CER 0.00% (done before)" third.txt || { echo "resume lost the result"; cat third.txt; exit 1; }
# The progress bar (forced: the output is not a terminal here): drawn in
# place with pages done / total, rate and ETA, ending full.
"$bin" --db bar.db --progress bar pages/letter.tif pages/notes.tif > bar.txt
grep -q "2/2 pages" bar.txt || { echo "no progress bar"; cat -A bar.txt; exit 1; }
grep -q "\[##############################\] 2/2 pages  [0-9.]* pages/s  ETA 0:00" bar.txt ||
  { echo "progress bar did not end full"; cat -A bar.txt; exit 1; }
# Bad option values are usage errors (exit 2) naming the option.
set +e
"$bin" --progress sideways > bad.txt 2>&1; rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q -- "--progress" bad.txt || { echo "bad --progress not refused"; exit 1; }
echo "cli ok"
