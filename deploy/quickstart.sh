#!/usr/bin/env bash
# Quickstart: the whole system on one machine, 46 branches and HQ, in a few minutes.
#
#   deploy/quickstart.sh [--branches N] [--duration 60s] [--products N] [--rate OPS_PER_S]
#                        [--schedule CRON] [--data-dir DIR]
#
# It builds the release binaries, starts a throwaway PostgreSQL for HQ (or uses
# HQ_DATABASE_URL, which must name an empty database), creates N SQLite branch databases
# with the demo schema and seed products (with image files), starts one branch-listener
# per branch on a loopback port and hq-puller on a cron schedule, runs the
# product-management workload (pm-sim) against all branches while showing progress,
# waits until HQ has caught up, and compares HQ with every branch row by row.
# Every process it started is stopped at the end (also on Ctrl-C); the data folder
# stays for inspection (configs, logs, databases, files).
#
#   --branches N      branch count (default 46)
#   --duration D      how long the workload writes (default 60s)
#   --products N      seed products per branch (default 100)
#   --rate R          workload operations per second, all branches together (default 200)
#   --schedule CRON   hq-puller schedule, cron with seconds (default "*/2 * * * * *")
#   --data-dir DIR    data folder (default ./demo-data); wiped at start
#
# Image files replicate too (files pull area); the final comparison is of rows, and the file
# count at HQ is reported (use `hq-puller verify` for a file-by-file check).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

branches=46
duration=60s
products=100
rate=200
schedule="*/2 * * * * *"
data=$root/demo-data

while [ $# -gt 0 ]; do
  case "$1" in
    --branches) branches=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --products) products=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --schedule) schedule=$2; shift 2 ;;
    --data-dir|--data) data=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$branches" in ''|*[!0-9]*) echo "quickstart: --branches must be a number" >&2; exit 2 ;; esac
if [ "$branches" -lt 1 ] || [ "$branches" -gt 99 ]; then
  echo "quickstart: --branches must be between 1 and 99" >&2; exit 2
fi

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }
started_at=$(date +%s)

# --- prerequisites ------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
command -v curl >/dev/null || die "curl not found (apt-get install curl)"
if [ -z "${HQ_DATABASE_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    say "installing postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  else
    die "PostgreSQL server binaries not found: run as root, or apt-get install postgresql, or set HQ_DATABASE_URL"
  fi
fi
command -v psql >/dev/null || die "psql not found (apt-get install postgresql-client)"
if [ -n "${HQ_DATABASE_URL:-}" ]; then
  used=$(psql -qtAX "$HQ_DATABASE_URL" -c "SELECT to_regclass('sync.locations') IS NOT NULL" 2>/dev/null) \
    || die "cannot connect to HQ_DATABASE_URL"
  if [ "$used" = t ]; then
    die "HQ_DATABASE_URL already holds an HQ (schema sync) from another run: give an empty database, or drop schemas sync and hq first"
  fi
fi

say "building release binaries (cargo build --release --workspace --bins)"
cargo build --release --workspace --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
for b in branch-listener hq-puller pm-sim; do
  [ -x "$bin/$b" ] || die "missing $bin/$b after the build"
done

# --- data folder, processes and cleanup ---------------------------------------------------
mkdir -p "$data"
data=$(cd "$data" && pwd)
rm -rf "$data/branches" "$data/hq" "$data/logs"
mkdir -p "$data/branches" "$data/hq/tokens" "$data/hq/files" "$data/logs"
export TEST_PG_DIR=$data/pg
pids=()
pg_started=0
cleanup() {
  local code=$?
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    say "stopping ${#pids[@]} processes"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
      local alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  if [ $pg_started = 1 ]; then "$root/tests/pg.sh" stop >/dev/null 2>&1 || true; fi
  echo "data folder kept for inspection: $data"
  exit $code
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- HQ database --------------------------------------------------------------------------
if [ -n "${HQ_DATABASE_URL:-}" ]; then
  hq_url=$HQ_DATABASE_URL
  say "HQ database: HQ_DATABASE_URL"
else
  say "starting a throwaway PostgreSQL for HQ in $TEST_PG_DIR"
  admin=$("$root/tests/pg.sh" ensure)
  pg_started=1
  PGOPTIONS='-c client_min_messages=warning' psql -q "$admin" \
    -c "DROP DATABASE IF EXISTS hq" -c "CREATE DATABASE hq" >/dev/null
  hq_url=${admin%/postgres}/hq
fi

# --- branches -----------------------------------------------------------------------------
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
PY
}
read -r -a ports <<<"$(free_ports "$branches")"
zones=(Europe/Berlin Europe/London Europe/Lisbon Europe/Warsaw Europe/Helsinki UTC)
locs=(); dbs=(); files=()
say "creating $branches SQLite branches (demo schema, capture triggers) in $data/branches"
for i in $(seq 1 "$branches"); do
  loc=$(printf 'b%02d' "$i")
  home=$data/branches/$loc
  mkdir -p "$home/files"
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  (umask 077; echo "$token" >"$home/token"; echo "$token" >"$data/hq/tokens/$loc")
  cat >"$home/branch-listener.toml" <<EOF
location = "$loc"
database_url = "sqlite://$home/pm.db"
listen = "127.0.0.1:${ports[$((i - 1))]}"
token_file = "$home/token"
time_zone = "${zones[$(( (i - 1) % ${#zones[@]} ))]}"
files_dir = "$home/files"
tick_interval = "1s"
log_format = "text"
EOF
  "$bin/branch-listener" install --config "$home/branch-listener.toml" --with-demo-schema \
    >>"$data/logs/$loc.log" 2>&1 || { tail -n 20 "$data/logs/$loc.log" >&2; die "installing $loc failed"; }
  locs+=("$loc"); dbs+=(--db "sqlite://$home/pm.db"); files+=(--files-dir "$home/files")
done

say "seeding $products products per branch ($((products * branches)) in total, with image files)"
"$bin/pm-sim" seed "${dbs[@]}" "${files[@]}" --products "$products" --seed 1 >"$data/logs/seed.json"

say "starting $branches branch-listener processes"
for i in $(seq 1 "$branches"); do
  loc=${locs[$((i - 1))]}
  "$bin/branch-listener" --config "$data/branches/$loc/branch-listener.toml" serve >>"$data/logs/$loc.log" 2>&1 &
  pids+=($!)
done
for i in $(seq 1 "$branches"); do
  port=${ports[$((i - 1))]}
  ok=0
  for _ in $(seq 1 150); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  [ $ok = 1 ] || { tail -n 20 "$data/logs/${locs[$((i - 1))]}.log" >&2; die "listener ${locs[$((i - 1))]} did not become healthy"; }
done

# --- HQ -----------------------------------------------------------------------------------
{
  echo "database_url = \"$hq_url\""
  echo "schedule = \"$schedule\""
  echo "max_concurrent_pulls = 8"
  echo "files_dir = \"$data/hq/files\""
  echo "run_budget = \"30s\""
  echo "request_timeout = \"10s\""
  echo "connect_timeout = \"2s\""
  echo "batch_limit = 5000"
  echo "log_format = \"text\""
  echo "# The listeners are on this machine's loopback: plain HTTP is acceptable here."
  echo "allow_plain_http = true"
  for i in $(seq 1 "$branches"); do
    loc=${locs[$((i - 1))]}
    printf '\n[[locations]]\nid = "%s"\nname = "Branch %s"\nurl = "http://127.0.0.1:%s"\ntoken_file = "%s"\n' \
      "$loc" "$loc" "${ports[$((i - 1))]}" "$data/hq/tokens/$loc"
  done
} >"$data/hq/hq-puller.toml"
say "hq-puller migrate, then run (schedule \"$schedule\")"
"$bin/hq-puller" migrate --config "$data/hq/hq-puller.toml" >>"$data/logs/hq-puller.log" 2>&1 \
  || { tail -n 20 "$data/logs/hq-puller.log" >&2; die "hq-puller migrate failed"; }
"$bin/hq-puller" --config "$data/hq/hq-puller.toml" run >>"$data/logs/hq-puller.log" 2>&1 &
hq_pid=$!
pids+=($hq_pid)

# --- workload with live progress ----------------------------------------------------------
hq_line() {
  psql -qtAX "$hq_url" -F ' ' -c "SELECT count(*) FILTER (WHERE state = 'ok'), count(*),
      COALESCE(sum(applied_changes), 0), COALESCE(sum(backlog), 0),
      COALESCE(round(max(lag_seconds)::numeric, 1), 0),
      count(*) FILTER (WHERE last_success_at IS NOT NULL)
    FROM sync.locations" 2>/dev/null
}
say "pm-sim writes to all $branches branches for $duration at ~$rate ops/s; HQ pulls on schedule"
"$bin/pm-sim" run "${dbs[@]}" "${files[@]}" --duration "$duration" --rate "$rate" --seed 2 \
  >"$data/logs/pm-sim.json" 2>"$data/logs/pm-sim.log" &
sim_pid=$!
pids+=($sim_pid)
sim_started=$(date +%s)
printf '%-6s | %-34s | %s\n' "time" "workload (pm-sim, all branches)" "HQ (sync.locations)"
while kill -0 "$sim_pid" 2>/dev/null; do
  sleep 5
  kill -0 "$hq_pid" 2>/dev/null || { tail -n 30 "$data/logs/hq-puller.log" >&2; die "hq-puller exited"; }
  sim=$(tail -n 1 "$data/logs/pm-sim.log" 2>/dev/null \
    | sed -nE 's/.*ops +([0-9]+) +\( *([0-9.]+)\/s\).*errors +([0-9]+).*/\1 ops (\2\/s), \3 errors/p')
  read -r ok total applied backlog lag pulled <<<"$(hq_line)" || true
  printf '%-6s | %-34s | %s/%s locations ok, %s pulled at least once, %s changes applied, backlog %s, max lag %ss\n' \
    "$(( $(date +%s) - sim_started ))s" "${sim:-starting}" "${ok:-?}" "${total:-?}" "${pulled:-?}" "${applied:-?}" "${backlog:-?}" "${lag:-?}"
done
wait "$sim_pid" || die "pm-sim failed: $(tail -n 5 "$data/logs/pm-sim.log")"
echo "workload summary: $(tr -d '\n ' <"$data/logs/pm-sim.json")"

# --- catch-up and comparison --------------------------------------------------------------
say "waiting until HQ has caught up, then comparing HQ with every branch"
# Each branch's zone-less timestamps are read in its own zone: verify per zone group.
verify_all() {
  local out=$data/verify.txt rc=0
  : >"$out"
  for z in "${zones[@]}"; do
    local args=(--hq "$hq_url" --time-zone "$z") n=0
    for i in $(seq 1 "$branches"); do
      [ "${zones[$(( (i - 1) % ${#zones[@]} ))]}" = "$z" ] || continue
      loc=${locs[$((i - 1))]}
      args+=(--location "$loc" --db "sqlite://$data/branches/$loc/pm.db"); n=$((n + 1))
    done
    [ $n = 0 ] && continue
    "$bin/pm-sim" verify "${args[@]}" >>"$out" 2>&1 || rc=1
  done
  return $rc
}
deadline=$(( $(date +%s) + 180 ))
until verify_all; do
  kill -0 "$hq_pid" 2>/dev/null || { tail -n 30 "$data/logs/hq-puller.log" >&2; die "hq-puller exited"; }
  if [ "$(date +%s)" -ge "$deadline" ]; then
    grep -E 'DIFF|missing|extra|different' "$data/verify.txt" | head -n 20 >&2
    die "HQ did not converge within 180 s after the workload; see $data/verify.txt and $data/logs/"
  fi
  read -r ok total applied backlog lag pulled <<<"$(hq_line)" || true
  echo "  catching up: $(grep -c 'DIFF$' "$data/verify.txt" || true) table/location pair(s) not equal yet, HQ backlog ${backlog:-?}"
  sleep 2
done

"$bin/hq-puller" status --config "$data/hq/hq-puller.toml" >"$data/hq/status.txt" 2>&1 || true
tables=$(grep -cE ' OK$' "$data/verify.txt" || true)
rows=$(awk '/ OK$/ { s += $4 } END { print s + 0 }' "$data/verify.txt")
echo
say "result"
echo "compared HQ (hq.<table>_live) with all $branches branch databases: $tables table/location pairs"
echo "(products, inventory, product_images, stock_movements), $rows rows, value by value"
echo "(decimals exact, timestamps as instants in each branch's zone, NULL vs empty kept apart):"
echo "ALL EQUAL. Totals over all locations:"
awk '$11 == "OK" || $11 == "DIFF" { b[$2] += $4; h[$2] += $8; n[$2]++ }
     END { for (t in b) printf "  %-16s %3d locations   branch %8d rows   HQ %8d rows\n", t, n[t], b[t], h[t] }' \
  "$data/verify.txt" | sort
echo "Per location and table (row counts and checksums of both sides): $data/verify.txt"
echo "hq-puller status: $data/hq/status.txt   logs: $data/logs/"
stored=$(psql -qtAX "$hq_url" -c "SELECT count(*) FROM sync.files WHERE state = 'stored'" 2>/dev/null || echo "?")
echo "image files stored at HQ (sync.files, content verified by sha256): $stored, under $data/hq/files/"
echo "total time: $(( $(date +%s) - started_at ))s"
