#!/usr/bin/env bash
# Throughput of a shared queue (docs/SCALING.md) with 1, 2 and 3 host
# processes on this machine, beside a single host that owns its schema
# (storage.shared off), all on one throwaway PostgreSQL (tests/
# with_postgres.sh) in the same run: docs/PERFORMANCE.md, "Several hosts".
#
#   bench/shared_hosts.sh HOST_BINARY [TASKS] [RUNS]
#
# HOST_BINARY is taskmgr_shared_host (build/<preset>/tests/): each host has
# 2 workers and creates its share of TASKS (default 3000) no-op tasks
# (started, random priority 0-9) as fast as it can while all of them claim
# and run. A run's figure is TASKS / (last finished_at - first created_at),
# read from the rows: full lifecycles (create, claim, start, complete,
# cleanup) per second. Medians of RUNS (default 3) runs per setting. It
# also reports the share of tasks that started out of priority order: a
# task T is out of order when a task of higher priority was queued before T
# started and started after T.
set -euo pipefail
if [ "${1:-}" != "--inner" ]; then
  [ $# -ge 1 ] || { echo "usage: $0 HOST_BINARY [TASKS] [RUNS]" >&2; exit 2; }
  exec "$(dirname "$0")/../tests/with_postgres.sh" bash "$0" --inner "$@"
fi
shift
host_bin=$(realpath "$1")
tasks=${2:-3000}
runs=${3:-3}
url=${TASKMGR_TEST_PG_URL:?run through tests/with_postgres.sh}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
q() { psql "$url" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

# One run: $1 schema, $2 hosts, $3 shared (1/0). Prints "rate out_of_order".
run() {
  local schema=$1 n=$2 shared=$3 pids=() i
  q "CREATE SCHEMA $schema"
  for ((i = 0; i < n; i++)); do
    local share=$((tasks / n + (i < tasks % n ? 1 : 0)))
    TASKMGR_HOST_SHARED=$shared "$host_bin" "$url" "$schema" "h$i" "$work/$schema.$i.log" \
      "$share" 30 5 0 0 > "$work/$schema.$i.out" 2> "$work/$schema.$i.err" &
    pids+=($!)
  done
  while :; do
    local ended
    ended=$(q "SELECT count(*) FROM $schema.tasks WHERE status = 'completed' \
               AND resource_cleanup_completed" 2>/dev/null || echo 0)
    [ "$ended" -ge "$tasks" ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -TERM "$p"; done
  for p in "${pids[@]}"; do wait "$p"; done
  q "SELECT round(($tasks / extract(epoch FROM max(finished_at) - min(created_at)))::numeric, 0)
     || ' ' || round((100.0 * count(*) FILTER (WHERE EXISTS (
          SELECT 1 FROM $schema.tasks u WHERE u.priority > t.priority
          AND u.queued_at <= t.started_at AND u.started_at > t.started_at)) / count(*))::numeric, 1)
     FROM $schema.tasks t"
}

median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

printf '%-26s %8s %s\n' setting "tasks/s" "(runs)   out of priority order % (runs)"
for setting in "1 0" "1 1" "2 1" "3 1"; do
  read -r n shared <<< "$setting"
  rates=() orders=()
  for ((r = 1; r <= runs; r++)); do
    read -r rate order < <(run "s${n}_${shared}_$r" "$n" "$shared")
    rates+=("$rate")
    orders+=("$order")
  done
  label="$n host(s), $([ "$shared" = 1 ] && echo shared || echo 'not shared')"
  printf '%-26s %8s (%s)   %s (%s)\n' "$label" \
    "$(printf '%s\n' "${rates[@]}" | median)" "${rates[*]}" \
    "$(printf '%s\n' "${orders[@]}" | median)" "${orders[*]}"
done
# The claim's pick (src/store/postgres_shared.cpp, PostgresShared::claim) on
# the last 3-host schema with 100,000 queued rows added, statistics fresh.
echo "claim query plan (100,000 queued rows):"
q "INSERT INTO s3_1_$runs.tasks (id, service, status, priority, queued_at, created_at)
   SELECT 'x' || g, 'work', 'queued', g % 10, now(), now() FROM generate_series(1, 100000) g;
   ANALYZE s3_1_$runs.tasks"
q "SET search_path TO s3_1_$runs; EXPLAIN SELECT id FROM tasks WHERE status = 'queued' AND
   claimed_by IS NULL AND service = ANY('{work}'::text[]) AND coalesce(estimated_memory_mb, 0)
   <= 1000 AND (requested_device IS NULL OR requested_device = ANY('{cpu}'::text[])) AND NOT
   (id = ANY('{}'::text[])) ORDER BY priority DESC, queued_at, id LIMIT 2
   FOR UPDATE SKIP LOCKED" | sed 's/^/  /'
