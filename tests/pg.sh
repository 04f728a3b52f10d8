#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests, benchmarks and the quickstart.
#
#   tests/pg.sh ensure   start the cluster if it is not running; print its admin URL
#   tests/pg.sh url      print the admin URL of the running cluster (exit 1 if none)
#   tests/pg.sh stop     stop the cluster (the data folder stays for inspection)
#   tests/pg.sh destroy  stop it and remove its folder
#
# The cluster lives in $TEST_PG_DIR (default: target/test-pg): data, socket folder,
# log and port file. It listens on 127.0.0.1 on a free port, trusts local connections
# (it holds only test data) and runs with fsync off. initdb refuses to run as root, so
# as root the server runs as the `postgres` user. `ensure` is safe to call from many
# processes at once (flock).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${TEST_PG_DIR:-$root/target/test-pg}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

pgbin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  echo "tests/pg.sh: no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)" >&2
  return 1
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 - <<'PY' 2>/dev/null || shuf -i 20000-60000 -n 1
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

url() {
  local port
  port=$(cat "$dir/port" 2>/dev/null) || return 1
  echo "postgres://postgres@127.0.0.1:$port/postgres"
}

running() {
  local bin
  bin=$(pgbin) || return 1
  [ -f "$dir/data/postmaster.pid" ] && as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1
}

ensure() {
  exec 9>"$dir/.lock"
  flock 9
  local bin
  bin=$(pgbin)
  if running; then url; return 0; fi
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    # postgres must be able to reach the folder through its parents.
    local p=$dir
    while [ "$p" != / ]; do p=$(dirname "$p"); chmod o+x "$p" 2>/dev/null || true; done
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    rm -rf "$dir/data"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  mkdir -p "$dir/sock"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/sock"
  local port
  port=$(free_port)
  echo "$port" >"$dir/port"
  as_owner "$bin/pg_ctl" start -D "$dir/data" -l "$dir/server.log" -w -t 60 9>&- -o \
    "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
     -c full_page_writes=off -c max_connections=400 -c shared_buffers=256MB -c wal_level=logical \
     -c max_wal_senders=20 -c max_replication_slots=20 -c max_locks_per_transaction=256" >/dev/null \
    || { tail -n 30 "$dir/server.log" >&2; exit 1; }
  url
}

stop() {
  local bin
  bin=$(pgbin) || return 0
  if running; then as_owner "$bin/pg_ctl" stop -D "$dir/data" -m fast -w >/dev/null; fi
}

case "${1:-ensure}" in
  ensure) ensure ;;
  url) url ;;
  stop) stop ;;
  destroy) stop; rm -rf "$dir" ;;
  *) echo "usage: tests/pg.sh ensure|url|stop|destroy" >&2; exit 2 ;;
esac
