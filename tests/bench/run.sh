#!/usr/bin/env bash
# THE benchmark command: builds the binaries, starts its own PostgreSQL cluster, runs
# every benchmark (ours and the peers, in the same run), prints one summary table and
# writes BENCHMARKS.md. See BENCHMARKS.md ("How to run") and docs/testing.md.
#
#   tests/bench/run.sh [--quick] [--reps N] [--out FILE] [--only a,b]
#
#   --quick    tiny sizes, 1 repetition, dev-profile binaries (no release build): checks
#              that every benchmark runs end to end; asserts no timing (the "met?"
#              column says "quick"); writes $CARGO_TARGET_DIR/BENCHMARKS-quick.md
#              unless --out is given.
#   --reps N   repetitions of each benchmark (default 3; medians with min–max).
#   --out FILE where to write the report (default: BENCHMARKS.md at the workspace root).
#   --only L   run only these benchmarks (comma-separated names from the list below).
#
# Environment: CARGO_TARGET_DIR (default target/); BENCH_PG_DIR, the cluster's folder
# (default $CARGO_TARGET_DIR/bench-pg; destroyed at exit, it holds GiBs of bench data).
#
# A benchmark is a binary `bench-<name>` of the `tests` crate that prints its section
# (markdown) on stdout, and one line `BENCH {json}` per summary row with the fields
# figure, ours, peer, ratio, target, met (tests::bench::Summary). A benchmark whose
# binary is not built gets a "not built" row; one that fails gets a "FAILED" row and
# the command exits 1 after writing the report.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
quick=0
reps=3
out=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --reps) reps=${2:?--reps needs a number}; shift ;;
    --out) out=${2:?--out needs a file}; shift ;;
    --only) only=${2:?--only needs a list}; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "tests/bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$reps" in ''|*[!0-9]*|0) echo "tests/bench/run.sh: --reps must be a positive number" >&2; exit 2 ;; esac
# System packages the benchmarks need (jq: the summary lines; rsync: the files peer),
# installed when absent, as tests/run.sh does for its own.
missing=()
command -v jq >/dev/null || missing+=(jq)
command -v rsync >/dev/null || missing+=(rsync)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/bench/run.sh: missing system packages: ${missing[*]}; install them as root: apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
  echo "==> installing missing system packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { echo "tests/bench/run.sh: apt-get install ${missing[*]} failed" >&2; exit 2; }
fi
# Bucardo, the second peer of bench-apply and bench-latency (issue 9), installed when
# absent (the package pulls postgresql-plperl for the server). Optional: if it cannot be
# installed (or its daemon does not start), those benchmarks report it "n/a (reason)".
if ! command -v bucardo >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing bucardo (a peer)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bucardo; } >/dev/null 2>&1 \
      || echo "tests/bench/run.sh: apt-get install bucardo failed; the benchmarks report Bucardo as n/a" >&2
  else
    echo "tests/bench/run.sh: bucardo is not installed (as root: apt-get install -y bucardo); the benchmarks report it as n/a" >&2
  fi
fi
target=${CARGO_TARGET_DIR:-$root/target}
if [ "$quick" = 1 ]; then reps=1; profile=dev; bindir=$target/debug; out=${out:-$target/BENCHMARKS-quick.md}
else profile=release; bindir=$target/release; out=${out:-$root/BENCHMARKS.md}; fi
command_line="tests/bench/run.sh $*"
[ "$quick" = 1 ] && command_line="tests/bench/run.sh --quick${only:+ --only $only}"
[ "$quick" = 0 ] && command_line="tests/bench/run.sh --reps $reps${only:+ --only $only}"
started=$(date +%s)

# name | what it measures | arguments (full run) | arguments (--quick)
benches=(
  "capture|trigger cost on the branch's own transactions|--rows 100000 --reps $reps|--rows 300 --reps 1 --mode client"
  "serve|listener serving rate and bytes on the wire|--changes 200000 --reps $reps|--changes 2000 --products 100 --reps 1"
  "apply|HQ catch-up of a 1,000,000-change backlog vs logical replication, Bucardo and COPY; memory|--changes 1000000 --locations 46 --reps $reps|--changes 4200 --locations 3 --reps 1 --idle-seconds 2"
  "latency|commit at a branch → visible at HQ, stream and schedule mode, vs logical replication and Bucardo|--samples 1000 --schedule-samples 300 --reps $reps|--samples 20 --schedule-samples 5 --reps 1"
  "idle|hq-puller with 1,000 idle locations on a 10-second schedule|--locations 1000 --baseline 10 --seconds 60 --reps $reps|--locations 20 --baseline 0 --seconds 3 --reps 1"
  "files|files: 10,000 images and one 2 GiB file vs rsync; peak memory|--reps $reps|--quick"
  "load|initial load of 1,000,000 rows vs pg_dump \| psql; verify time|--rows 1000000 --reps $reps|--rows 2000 --page-rows 500 --reps 1"
)

# --- build ------------------------------------------------------------------------------
if [ "$quick" = 1 ]; then
  echo "==> cargo build --workspace --bins (dev profile, --quick)"
  cargo build --workspace --bins
else
  echo "==> cargo build --release -p branch-listener -p hq-puller -p tests --bins"
  cargo build --release -p branch-listener -p hq-puller -p tests --bins
fi

# --- PostgreSQL -------------------------------------------------------------------------
export TEST_PG_DIR=${BENCH_PG_DIR:-$target/bench-pg}
work=$(mktemp -d)
cleanup() { "$root/tests/pg.sh" destroy >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
echo "==> starting PostgreSQL in $TEST_PG_DIR"
TEST_PG_URL=$("$root/tests/pg.sh" ensure)
export TEST_PG_URL
pg_version=$(psql "$TEST_PG_URL" -Atc 'SHOW server_version' 2>/dev/null \
  || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1 | cut -d/ -f4)
# 1,000 idle locations hold a socket each on both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --- run --------------------------------------------------------------------------------
failed=0
rows=()       # summary rows (markdown)
sections=()   # per-bench files with their section
for entry in "${benches[@]}"; do
  IFS='|' read -r name what full_args quick_args <<<"${entry//\\|/$'\x1f'}"
  what_md=${what//$'\x1f'/\\|}   # inside a table cell
  what=${what//$'\x1f'/|}
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then continue; fi
  bin=$bindir/bench-$name
  section=$work/$name.md
  sections+=("$section")
  if [ ! -x "$bin" ]; then
    echo "==> bench-$name: not built"
    rows+=("| $what_md | not built | | | | |")
    printf '## %s (`bench-%s`)\n\nNot built in this tree: `bench-%s` does not exist yet.\n' "${what^}" "$name" "$name" >"$section"
    continue
  fi
  if [ "$quick" = 1 ]; then args=$quick_args; else args=$full_args; fi
  echo "==> bench-$name $args"
  t0=$(date +%s)
  load0=$(cut -d' ' -f1 /proc/loadavg)
  set +e
  # shellcheck disable=SC2086
  "$bin" $args >"$work/$name.out" 2> >(tee "$work/$name.err" >&2)
  rc=$?
  set -e
  secs=$(( $(date +%s) - t0 ))
  grep -v '^BENCH ' "$work/$name.out" || true
  {
    printf '## %s (`bench-%s`)\n\n' "${what^}" "$name"
    printf 'Command: `%s %s` (%s s; 1-minute load average %s at the start, %s at the end, on %s cores).\n\n' \
      "target/$( [ "$quick" = 1 ] && echo debug || echo release )/bench-$name" "$args" "$secs" \
      "$load0" "$(cut -d' ' -f1 /proc/loadavg)" "$(nproc)"
    # A blank line around each table, so that markdown renders it.
    grep -v '^BENCH ' "$work/$name.out" | sed '/^reproduce:/d' \
      | awk '{ t = ($0 ~ /^\|/); if (NR > 1 && t != pt) print ""; print; pt = t }' || true
    if [ -f "$root/tests/bench/notes/$name.md" ]; then
      printf '\n'
      cat "$root/tests/bench/notes/$name.md"
    fi
  } >"$section"
  if [ "$rc" != 0 ]; then
    failed=1
    rows+=("| $what_md | FAILED (exit $rc) | | | | |")
    { printf '\n**FAILED** (exit %s); stderr tail:\n\n```\n' "$rc"; tail -n 20 "$work/$name.err"; printf '```\n'; } >>"$section"
    echo "==> bench-$name FAILED (exit $rc)" >&2
    continue
  fi
  n=0
  while IFS= read -r line; do
    n=$((n + 1))
    if [ "$quick" = 1 ]; then
      rows+=("$(jq -r '"| \(.figure) | \(.ours) | \(.peer) | \(.ratio) | \(.target) | quick run |"' <<<"${line#BENCH }")")
    else
      rows+=("$(jq -r '"| \(.figure) | \(.ours) | \(.peer) | \(.ratio) | \(.target) | \(if .met == "yes" then "**yes**" else .met end) |"' <<<"${line#BENCH }")")
    fi
  done < <(grep '^BENCH ' "$work/$name.out" || true)
  if [ "$n" = 0 ]; then
    failed=1
    rows+=("| $what_md | FAILED (no BENCH summary line) | | | | |")
  fi
done

# --- report -----------------------------------------------------------------------------
summary=$(
  echo "| figure | ours | peer | ratio | target | met? |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
)
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem_gib=$(awk '/MemTotal/ {printf "%.0f", $2/1024/1024}' /proc/meminfo)
total=$(( $(date +%s) - started ))
{
  echo "# Benchmarks"
  echo
  echo "Written by \`$command_line\` (do not edit by hand: the narrative of each section"
  echo "lives in \`tests/bench/notes/<bench>.md\`). Timings live here, never in pass/fail tests."
  echo
  if [ "$quick" = 1 ]; then
    echo "**Quick run** (\`--quick\`): tiny sizes, one repetition, dev-profile binaries;"
    echo "the figures only show that every benchmark runs; no target is judged."
    echo
  fi
  echo "- **Machine**: $(nproc) cores ($cpu_model), $mem_gib GiB RAM, $(uname -sr)"
  echo "- **Date**: $(date -u '+%Y-%m-%d %H:%M UTC'); the whole run took $(( total / 60 )) min $(( total % 60 )) s"
  echo "- **Command**: \`$command_line\` ($profile profile; $reps repetition(s), medians with min–max)"
  echo "- **PostgreSQL** $pg_version, the throwaway cluster of \`tests/pg.sh\` (\`fsync=off\`,"
  echo "  \`synchronous_commit=off\`: the same settings for us and every peer); SQLite in WAL"
  echo "  mode (\`synchronous=NORMAL\`, sqlx's bundled SQLite). Every process (branches,"
  echo "  listeners, hq-puller, PostgreSQL, peers) shares the machine's cores; other load on"
  echo "  the machine shows in each section's load average (above the core count: contended)."
  echo
  echo "## Summary"
  echo
  echo "$summary"
  echo
  for s in "${sections[@]}"; do cat "$s"; echo; done
  if [ -f "$root/tests/bench/notes/_end.md" ]; then cat "$root/tests/bench/notes/_end.md"; fi
} >"$out"

echo
echo "$summary"
echo
echo "report written to $out (${total} s)"
if [ "$failed" = 1 ]; then
  echo "tests/bench/run.sh: some benchmarks failed (see their sections in $out)" >&2
  exit 1
fi
