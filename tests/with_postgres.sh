#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL cluster:
#
#   tests/with_postgres.sh CMD [ARG...]
#
# initdb into a new temporary folder (as the unprivileged `postgres` user when
# run as root: PostgreSQL refuses to run as root), start it listening only
# on a Unix socket in that folder (no TCP port, nothing another process on
# the machine can reach by accident), create the database `taskmgr`, export
# TASKMGR_TEST_PG_URL (postgresql:///taskmgr?host=DIR&user=postgres) and run
# CMD. The cluster is stopped and the folder removed at the end, also when
# CMD fails or the script is interrupted; the exit status is CMD's. When the
# server cannot be set up or started, it says why and exits 1 without
# running CMD.
#
# fsync stays on (the kill tests rely on committed data surviving); the
# server is small (shared_buffers 16MB). TASKMGR_PG_BIN overrides the folder
# of the server binaries (default /usr/lib/postgresql/15/bin, Debian's
# postgresql-15; scripts/setup.sh installs it).
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 CMD [ARG...]" >&2
  exit 2
fi

pg_bin=${TASKMGR_PG_BIN:-/usr/lib/postgresql/15/bin}
for tool in initdb pg_ctl; do
  if [ ! -x "$pg_bin/$tool" ]; then
    echo "with_postgres: $pg_bin/$tool not found: install postgresql-15 (scripts/setup.sh) or set TASKMGR_PG_BIN" >&2
    exit 1
  fi
done

# As root, the server runs as `postgres` (Debian's package creates it).
pg_user=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    echo "with_postgres: running as root, but there is no 'postgres' user to run the server as" >&2
    exit 1
  fi
  pg_user=postgres
fi
as_server_user() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd "$dir" && runuser -u postgres -- "$@")
  else
    (cd "$dir" && "$@")
  fi
}

dir=$(mktemp -d "${TMPDIR:-/tmp}/taskmgr-pg.XXXXXX")
started=0
cleanup() {
  if [ "$started" -eq 1 ]; then
    as_server_user "$pg_bin/pg_ctl" stop -D "$dir/data" -m fast -w -t 60 >/dev/null 2>&1 ||
      as_server_user "$pg_bin/pg_ctl" stop -D "$dir/data" -m immediate -w >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; fi
chmod 700 "$dir"

if ! as_server_user "$pg_bin/initdb" -D "$dir/data" -U "$pg_user" --auth=trust \
  --encoding=UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1; then
  echo "with_postgres: initdb failed:" >&2
  cat "$dir/initdb.log" >&2
  exit 1
fi

if ! as_server_user "$pg_bin/pg_ctl" start -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-c listen_addresses='' -c unix_socket_directories='$dir' -c shared_buffers=16MB -c fsync=on -c max_connections=100" \
  >/dev/null 2>&1; then
  echo "with_postgres: the server did not start; its log:" >&2
  cat "$dir/server.log" >&2 || true
  exit 1
fi
started=1

if ! as_server_user "$pg_bin/psql" -h "$dir" -U "$pg_user" -d postgres -v ON_ERROR_STOP=1 -qAt \
  -c "CREATE DATABASE taskmgr" >"$dir/createdb.log" 2>&1; then
  echo "with_postgres: cannot create the database:" >&2
  cat "$dir/createdb.log" >&2
  exit 1
fi

export TASKMGR_TEST_PG_URL="postgresql:///taskmgr?host=$dir&user=$pg_user"
export TASKMGR_TEST_PG_SOCKET_DIR="$dir"
# In the background, so that a signal to this script is handled at once
# (bash runs traps only after a foreground command ends): it is passed on
# to CMD, then the cluster goes.
set +e
"$@" <&0 &
child=$!
forward() {
  kill "-$1" "$child" 2>/dev/null
  wait "$child" 2>/dev/null
  exit "$2"
}
trap 'forward INT 130' INT
trap 'forward TERM 143' TERM
wait "$child"
rc=$?
exit "$rc"
