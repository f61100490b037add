#!/usr/bin/env bash
# Load figures for taskmgr-http with wrk (Debian's package): requests/s and
# p99 latency for GET /health, GET /tasks/{id} and POST /tasks (a small
# upload, base64 in JSON) with 64 connections, for each binary given, one
# after the other in the same run (docs/PERFORMANCE.md, "taskmgr-http").
#
#   bench/http_load.sh SECONDS BINARY...
#
# A binary without GET /health (the thread-per-connection version) answers
# it 404: the transport is measured all the same.
set -euo pipefail
secs=${1:?seconds}; shift
[ $# -ge 1 ] || { echo "usage: $0 SECONDS BINARY..." >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing (scripts/setup.sh installs it)" >&2; exit 2; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/config.yaml" <<'YAML'
devices:
  probe_cpu: false
  probe_nvidia: false
  cpu_memory_mb: 4000
storage:
  synchronous: normal
YAML
# A 1x1 grey PNG, base64: the upload of POST /tasks.
png='iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAG7buVgAAAABJRU5ErkJggg=='
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"service":"ocr","input":{"data_base64":"$png","media_type":"image/png"}}'
LUA
summary() {  # wrk output -> "req/s p99"
  awk '/Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} END {print rps, p99}'
}
printf '%-40s %-18s %12s %10s\n' binary route "req/s" "p99"
for bin in "$@"; do
  rm -f "$work/port" "$work"/t.db*
  "$bin" --port 0 --config "$work/config.yaml" --db "$work/t.db" --port-file "$work/port" \
    > "$work/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do [ -s "$work/port" ] && break; sleep 0.05; done
  port=$(cat "$work/port")
  id=$(curl -s -X POST "http://127.0.0.1:$port/tasks" -H 'Content-Type: application/json' \
       -d "{\"input\":{\"data_base64\":\"$png\"}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  for route in health task post; do
    case $route in
      health) args=("http://127.0.0.1:$port/health") ;;
      task) args=("http://127.0.0.1:$port/tasks/$id") ;;
      post) args=(-s "$work/post.lua" "http://127.0.0.1:$port/tasks") ;;
    esac
    out=$(wrk -t2 -c64 -d"${secs}s" --latency "${args[@]}")
    read -r rps p99 < <(echo "$out" | summary)
    printf "%-40s %-18s %12s %10s\n" "$bin" "$route" "$rps" "$p99"
  done
  kill -TERM "$pid"; wait "$pid" || true
done
