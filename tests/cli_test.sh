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
grep -q "pages           5 (3 already done)" third.txt || { echo "finished pages were redone"; cat third.txt; exit 1; }
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
"$bin" --queue-ahead -1 pages > bad.txt 2>&1 && rc=0 || rc=$?
[ "$rc" -eq 2 ] && grep -q -- "--queue-ahead must be in \[0, 10000\], got -1" bad.txt ||
  { cat bad.txt; echo "bad --queue-ahead not refused"; exit 1; }
# A result holds word boxes only when the output needs them (json): the
# text run above stored none; a json run of the same page reads it again
# (its identity says words) and writes them.
[ "$(sqlite3 run.db "SELECT count(*) FROM tasks WHERE result LIKE '%\"words\"%'")" -eq 0 ] ||
  { echo "a text run stored word boxes"; exit 1; }
"$bin" --db run.db --format json --out jout pages/letter.tif > json.txt
grep -q "pages           1 (0 already done)" json.txt || { cat json.txt; echo "json did not read again"; exit 1; }
grep -q '"words":\[{"text":"' jout/letter.json || { head -c 300 jout/letter.json; echo "no words in json"; exit 1; }
# What a stranger found (each once a crash, a whole batch stopped, or silence):
# a language without its data is a configuration error (exit 2), not an abort;
"$bin" --db opt.db --languages xyz pages/letter.tif > lang.txt 2>&1 && rc=0 || rc=$?
[ "$rc" -eq 2 ] && grep -q "ocr.languages" lang.txt && grep -q "no language data for 'xyz'" lang.txt ||
  { cat lang.txt; echo "bad --languages: exit $rc"; exit 1; }
# an unknown --device is a usage error naming it, before anything runs;
"$bin" --db opt.db --device cuda:7 pages/letter.tif > dev.txt 2>&1 && rc=0 || rc=$?
[ "$rc" -eq 2 ] && grep -q -- "--device cuda:7: no such device (devices: cpu" dev.txt ||
  { cat dev.txt; echo "unknown --device: exit $rc"; exit 1; }
# an --out that cannot take files says why, before any page is read;
echo x > afile
"$bin" --db opt.db --out afile/sub pages/letter.tif > out.txt 2>&1 && rc=0 || rc=$?
[ "$rc" -eq 2 ] && grep -q -- "--out afile/sub: cannot write there: " out.txt ||
  { cat out.txt; echo "unwritable --out: exit $rc"; exit 1; }
# a file name that is not UTF-8, a dangling symlink and a FIFO in a folder are
# each a failed page with its reason; the other pages are read.
mkdir odd
cp pages/notes.tif odd/good.tif
cp pages/notes.tif "odd/$(printf 'bad\xffname.tif')"
ln -s /nonexistent/x.png odd/dangling.png
mkfifo odd/pipe.tif
"$bin" --db odd.db --progress lines odd > odd.txt 2>&1 && rc=0 || rc=$?
cat odd.txt
[ "$rc" -eq 1 ] || { echo "odd folder: exit $rc, expected 1"; exit 1; }
grep -q "] odd/good.tif (" odd.txt || { echo "the good page was not read"; exit 1; }
LC_ALL=C grep -aq "FAILED odd/bad.*name.tif: invalid_input: not accepted as a task: .*not valid UTF-8" odd.txt ||
  { echo "the non-UTF-8 name is not reported"; exit 1; }
grep -q "FAILED odd/dangling.png: invalid_input" odd.txt || { echo "dangling link not reported"; exit 1; }
grep -q "FAILED odd/pipe.tif: invalid_input: not accepted as a task: not a regular file" odd.txt ||
  { echo "FIFO not reported"; exit 1; }
grep -q "not accepted    2 (no task made)" odd.txt || { echo "summary lacks the refused pages"; exit 1; }
# A name of 253 bytes (no room for its ".gt.txt") is read, not an abort.
long_name="pages2/$(printf 'a%.0s' $(seq 1 249)).tif"
mkdir pages2 && cp pages/notes.tif "$long_name"
"$bin" --db long.db --progress lines pages2 > long.txt 2>&1 && rc=0 || rc=$?
[ "$rc" -eq 0 ] && grep -q "completed       1" long.txt || { cat long.txt; echo "long name: exit $rc"; exit 1; }
# The configuration's storage.path is used when --db is not given, and
# --print-config shows what is in force.
printf 'storage:\n  path: fromconfig.db\nocr:\n  orientation: always\n' > conf.yaml
"$bin" --config conf.yaml --print-config > printed.yaml
grep -q "path: fromconfig.db" printed.yaml && grep -q "orientation: always" printed.yaml ||
  { cat printed.yaml; echo "--print-config"; exit 1; }
"$bin" --config conf.yaml --progress lines pages/letter.tif > conf.txt
grep -q "database fromconfig.db" conf.txt && [ -f fromconfig.db ] || { cat conf.txt; echo "storage.path ignored"; exit 1; }
# Other OCR settings are another reading: the page is read again.
"$bin" --db run.db --config conf.yaml --progress lines pages/letter.tif > again.txt
grep -q "pages           1 (0 already done)" again.txt || { cat again.txt; echo "other settings reused a result"; exit 1; }
# A page whose task failed INTERRUPTED (the process died under it each time)
# is not tried again by itself: reported, exit 1; --redo tries it.
sqlite3 run.db "UPDATE tasks SET status='failed', failure_reason='interrupted', failure_message='the process stopped while the task ran (attempt 5 of 5); no attempts left' WHERE input_path LIKE '%/pages/notes.tif'"
"$bin" --db run.db --progress lines pages/notes.tif > intr.txt 2>&1 && rc=0 || rc=$?
[ "$rc" -eq 1 ] && grep -q "FAILED pages/notes.tif: interrupted: .*(in an earlier run; --redo tries it again)" intr.txt ||
  { cat intr.txt; echo "interrupted page: exit $rc"; exit 1; }
"$bin" --db run.db --progress lines --redo pages/notes.tif > redo.txt
grep -q "completed       1" redo.txt || { cat redo.txt; echo "--redo"; exit 1; }
# SIGTERM stops the run: the pages in flight finish, the summary is printed,
# exit 143; the next run goes on.
mkdir many
for i in $(seq -w 1 30); do cp pages/notes.tif "many/p$i.tif"; done
"$bin" --db sig.db --progress lines many > sig.txt 2>&1 &
pid=$!
# Once the first page has ended (a loaded machine may take long to start).
for _ in $(seq 1 600); do
  grep -q '^\[1/30\]' sig.txt 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.2
done
kill -TERM "$pid"
wait "$pid" && rc=0 || rc=$?
[ "$rc" -eq 143 ] && grep -q "^summary" sig.txt && grep -q "not started" sig.txt ||
  { cat sig.txt; echo "SIGTERM: exit $rc"; exit 1; }
[ "$(sqlite3 sig.db "SELECT count(*) FROM tasks WHERE status IN ('queued','running','pending')")" -eq 0 ] ||
  { echo "SIGTERM left tasks unfinished"; exit 1; }
"$bin" --db sig.db --progress lines many > sig2.txt
grep -q "pages           30 (" sig2.txt && grep -q "failed          0" sig2.txt || { cat sig2.txt; exit 1; }
echo "cli ok"
