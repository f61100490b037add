#!/usr/bin/env bash
# taskmgr-ocr is killed (SIGKILL) at random points at least 20 times over a
# 60-page folder, restarted on the same database each time, then left to
# finish. Afterwards the database holds exactly one task per page, every
# page completed, nothing queued or pending, exactly one `completed` event
# per page, and the last run's summary equals the database.
#   cli_resume_test.sh TASKMGR_OCR [KILLS]
set -euo pipefail
bin=$(realpath "$1")
want_kills="${2:-22}"
work=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
  if [ -n "${TASKMGR_KEEP_WORK:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
cd "$work"
mkdir src pages
lines=("The quick brown fox jumps over the lazy dog." "Pack my box with five dozen liquor jugs."
  "Sphinx of black quartz, judge my vow." "How vexingly quick daft zebras jump!")
# Three pages of ten lines (about 0.4 s of OCR each here): 60 pages are
# about 12 s of work on two cores, more than the runs the kills allow.
for v in 0 1 2; do
  for l in 0 1 2 3 4 5 6 7 8 9; do echo "${lines[$(((v + l) % 4))]}"; done > "src/v$v.txt"
  text2image --text="src/v$v.txt" --outputbase="src/v$v" --font='DejaVu Sans' \
    --fonts_dir=/usr/share/fonts/truetype/dejavu --resolution=300 --ptsize=12 --margin=60 \
    --xsize=1700 --ysize=1200 > /dev/null 2>&1
done
for i in $(seq -w 1 60); do
  v=$((10#$i % 3))
  cp "src/v$v.tif" "pages/page$i.tif"
  cp "src/v$v.txt" "pages/page$i.gt.txt"
done

kills=0
runs=0
RANDOM=$$
while [ "$kills" -lt "$want_kills" ]; do
  runs=$((runs + 1))
  [ "$runs" -le 200 ] || { echo "the batch finished before $want_kills kills"; exit 1; }
  "$bin" --db run.db --progress lines pages > "run$runs.log" 2>&1 &
  pid=$!
  # A random point in the first 1.5 s: during the start (recovery,
  # adoption), a submission or a page's OCR.
  sleep "0.$((RANDOM % 10))$((RANDOM % 10))"
  [ $((RANDOM % 3)) -eq 0 ] && sleep 0.$((RANDOM % 10))
  if kill -9 "$pid" 2>/dev/null; then kills=$((kills + 1)); fi
  wait "$pid" 2>/dev/null || true
  pid=""
done
echo "killed $kills time(s) in $runs run(s)"
set +e
"$bin" --db run.db --progress lines pages > final.log 2>&1
rc=$?
set -e
cat final.log
[ "$rc" -eq 0 ] || { echo "final run exit code $rc"; exit 1; }

q() { sqlite3 run.db "$1"; }
fail() {
  echo "FAIL: $1"
  sqlite3 run.db "SELECT input_path, status, attempt, failure_reason FROM tasks ORDER BY input_path" | head -80
  exit 1
}
[ "$(q "SELECT count(*) FROM tasks")" -eq 60 ] || fail "$(q "SELECT count(*) FROM tasks") tasks for 60 pages"
[ "$(q "SELECT count(DISTINCT input_path) FROM tasks")" -eq 60 ] || fail "not one task per page"
[ "$(q "SELECT count(*) FROM tasks WHERE status='completed'")" -eq 60 ] || fail "not every page completed"
[ "$(q "SELECT count(*) FROM tasks WHERE status IN ('queued','pending','running')")" -eq 0 ] ||
  fail "tasks left unfinished"
[ "$(q "SELECT count(*) FROM task_events WHERE event_type='completed'")" -eq 60 ] ||
  fail "$(q "SELECT count(*) FROM task_events WHERE event_type='completed'") completed events for 60 pages"
[ -z "$(q "SELECT task_id FROM task_events WHERE event_type='completed' GROUP BY task_id HAVING count(*) <> 1")" ] ||
  fail "a page with more than one completed event"
# The summary of the last run is the database's: pages done before plus
# pages completed now = the completed tasks; nothing failed.
before=$(sed -n 's/^  pages *60 (\([0-9]*\) already done)$/\1/p' final.log)
now=$(sed -n 's/^  completed *\([0-9]*\)$/\1/p' final.log)
[ -n "$before" ] && [ -n "$now" ] || fail "no summary"
[ $((before + now)) -eq 60 ] || fail "summary: $before before + $now now is not 60"
grep -q "^  failed          0$" final.log || fail "summary counts failures"
echo "resume ok: $kills kills, 60 pages, one task and one completed event each"
