#!/usr/bin/env bash
# The reliability soak (NOT part of the suite): 46 branches under sustained writes with
# random faults (network faults through proxies, kill -9 of listeners and of
# hq-puller); at the end every location is compared with its branch.
#
#   tests/soak.sh [--duration 10m] [--branches 46] [--rate 150] [--products 30]
#                 [--fault-every 3s] [--hq-kills-per-minute 20] [--seed 1] [--tls] [--release]
#
# --tls: the listeners serve HTTPS with certificates of a private CA
# (deploy/make-test-ca.sh) and HQ trusts only that CA.
#
# Builds the binaries (debug, or --release), starts the throwaway PostgreSQL
# (tests/pg.sh), runs the `soak` binary (tests/src/bin/soak.rs) and prints its report:
# changes, faults injected by kind, maximum lag, "nothing lost". Exit 1 on any
# difference between HQ and a branch. Figures: RELIABILITY.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
profile=debug
args=()
for a in "$@"; do
  if [ "$a" = --release ]; then profile=release; else args+=("$a"); fi
done
build=(cargo build --workspace --bins)
[ "$profile" = release ] && build+=(--release)
"${build[@]}"
export TEST_PG_URL=${TEST_PG_URL:-$("$root/tests/pg.sh" ensure)}
target=${CARGO_TARGET_DIR:-$root/target}
# A soak opens ~50 processes with several connections each.
ulimit -n 65536 2>/dev/null || true
exec "$target/$profile/soak" "${args[@]}"
