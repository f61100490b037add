#!/usr/bin/env bash
# Throughput of a shared queue (docs/SCALING.md) with 1, 2 and 3 host
# processes on this machine, beside a single host that owns its schema
# (storage.shared off), all on one throwaway PostgreSQL (tests/
# with_postgres.sh) in the same run: docs/PERFORMANCE.md, "Several hosts".
#
#   bench/shared_hosts.sh HOST_BINARY [TASKS] [RUNS] [MS]
#
# HOST_BINARY is taskmgr_shared_host (build/<preset>/tests/): each host has
# 2 workers and creates its share of TASKS (default 3000) tasks that each
# sleep MS milliseconds (default 0: no-op tasks)
# (started, random priority 0-9) as fast as it can while all of them claim
# and run: TASKS / (last finished_at - first created_at), read from the
# rows, is full lifecycles (create, claim, start, complete, cleanup) per
# second. Then a drained queue: TASKS queued first (random priorities 0-9),
# then the hosts start and run them all: tasks/s from the first start to
# the last end, and the share of tasks that started out of priority order
# (a task of higher priority started after it). Medians of RUNS (default
# 3) runs per setting.
set -euo pipefail
if [ "${1:-}" != "--inner" ]; then
  [ $# -ge 1 ] || { echo "usage: $0 HOST_BINARY [TASKS] [RUNS] [MS]" >&2; exit 2; }
  exec "$(dirname "$0")/../tests/with_postgres.sh" bash "$0" --inner "$@"
fi
shift
host_bin=$(realpath "$1")
tasks=${2:-3000}
runs=${3:-3}
ms=${4:-0}
url=${TASKMGR_TEST_PG_URL:?run through tests/with_postgres.sh}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
q() { psql "$url" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

# Starts $2 hosts on schema $1 (shared: $3), each creating $4 tasks in all
# (split between them), and waits until every task of the schema ($5) has
# completed; then stops them.
hosts() {
  local schema=$1 n=$2 shared=$3 create=$4 total=$5 pids=() i
  for ((i = 0; i < n; i++)); do
    local share=$((create / n + (i < create % n ? 1 : 0)))
    TASKMGR_HOST_SHARED=$shared "$host_bin" "$url" "$schema" "h$i" "$work/$schema.$i.log" \
      "$share" 30 5 "$ms" "$ms" > "$work/$schema.$i.out" 2> "$work/$schema.$i.err" &
    pids+=($!)
  done
  while :; do
    local ended
    ended=$(q "SELECT count(*) FROM $schema.tasks WHERE status = 'completed' \
               AND resource_cleanup_completed" 2>/dev/null || echo 0)
    [ "$ended" -ge "$total" ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -TERM "$p"; done
  for p in "${pids[@]}"; do wait "$p"; done
}

# Created and run at once: $1 schema, $2 hosts, $3 shared. Prints the
# lifecycles/s (created to completed).
run_created() {
  local schema=$1
  q "CREATE SCHEMA $schema"
  hosts "$schema" "$2" "$3" "$tasks" "$tasks"
  q "SELECT round(($tasks / extract(epoch FROM max(finished_at) - min(created_at)))::numeric, 0)
     FROM $schema.tasks"
}

# A queue drained: $tasks queued first (random priorities 0-9), then the
# hosts start and run them all. Prints "tasks/s out_of_order_%": with every
# task queued before any started, a task T started out of priority order
# when a task of higher priority started after it.
run_drained() {
  local schema=$1
  q "CREATE SCHEMA $schema"
  # The schema's tables as taskmgr makes them: a host that creates nothing.
  TASKMGR_HOST_SHARED=$3 "$host_bin" "$url" "$schema" setup "$work/$schema.setup.log" 0 \
    > "$work/$schema.setup.out" 2>&1 &
  local setup=$!
  until grep -q READY "$work/$schema.setup.out" 2>/dev/null; do sleep 0.05; done
  kill -TERM "$setup"
  wait "$setup"
  q "INSERT INTO $schema.tasks (id, service, status, priority, attempt, batch_size, options,
       created_at, queued_at, resource_cleanup_completed)
     SELECT 'q' || lpad(g::text, 6, '0'), 'work', 'queued', (g * 7919) % 10, 0, 1, '{\"ms\":$ms}',
       now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC', FALSE
     FROM generate_series(1, $tasks) g"
  hosts "$schema" "$2" "$3" 0 "$tasks"
  q "SELECT round(($tasks / extract(epoch FROM max(finished_at) - min(started_at)))::numeric, 0)
     || ' ' || round((100.0 * count(*) FILTER (WHERE EXISTS (
          SELECT 1 FROM $schema.tasks u WHERE u.priority > t.priority
          AND u.started_at > t.started_at)) / count(*))::numeric, 1)
     FROM $schema.tasks t"
}

median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

printf '%-24s %-28s %-28s %s\n' setting "created+run tasks/s (runs)" "drained tasks/s (runs)" \
  "out of priority order % (runs)"
for setting in "1 0" "1 1" "2 1" "3 1"; do
  read -r n shared <<< "$setting"
  created=() drained=() orders=()
  for ((r = 1; r <= runs; r++)); do
    created+=("$(run_created "c${n}_${shared}_$r" "$n" "$shared")")
    read -r rate order < <(run_drained "d${n}_${shared}_$r" "$n" "$shared")
    drained+=("$rate")
    orders+=("$order")
  done
  label="$n host(s), $([ "$shared" = 1 ] && echo shared || echo 'not shared')"
  printf '%-24s %-28s %-28s %s\n' "$label" \
    "$(printf '%s\n' "${created[@]}" | median) (${created[*]})" \
    "$(printf '%s\n' "${drained[@]}" | median) (${drained[*]})" \
    "$(printf '%s\n' "${orders[@]}" | median) (${orders[*]})"
done
# The claim's pick (src/store/postgres_shared.cpp, PostgresShared::claim) on
# the last 3-host schema with 100,000 queued rows added, statistics fresh.
echo "claim query plan (100,000 queued rows):"
q "INSERT INTO c3_1_$runs.tasks (id, service, status, priority, queued_at, created_at)
   SELECT 'x' || g, 'work', 'queued', g % 10, now(), now() FROM generate_series(1, 100000) g;
   ANALYZE c3_1_$runs.tasks"
q "SET search_path TO c3_1_$runs; EXPLAIN SELECT id FROM tasks WHERE status = 'queued' AND
   claimed_by IS NULL AND service = ANY('{work}'::text[]) AND coalesce(estimated_memory_mb, 0)
   <= 1000 AND (requested_device IS NULL OR requested_device = ANY('{cpu}'::text[])) AND NOT
   (id = ANY('{}'::text[])) ORDER BY priority DESC, queued_at, id LIMIT 2
   FOR UPDATE SKIP LOCKED" | sed 's/^/  /'
