#!/usr/bin/env bash
# Longer fuzzing runs of the bad-input properties (the suite runs 64-128 cases each):
#
#   tests/fuzz.sh [CASES]        (default 20000; the HQ apply sample runs CASES/100, at most 200)
#
# Runs: the HQ batch decoder + validator, the hostile-batch apply sample against a real
# HQ, HQ config loading (hq-puller/tests/puller/fuzz.rs); the listener's query parsing,
# cursor parsing, config loading (branch-listener/tests/fuzz.rs). A failure prints the
# minimal failing input (proptest shrinks it) and persists its seed under
# proptest-regressions/ for the next run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cases=${1:-20000}
export TEST_PG_URL=${TEST_PG_URL:-$("$root/tests/pg.sh" ensure)}
PROPTEST_CASES=$cases cargo test -p branch-listener --test fuzz
PROPTEST_CASES=$cases cargo test -p hq-puller --test puller fuzz:: -- --skip hostile_batches
PROPTEST_CASES=$(( cases / 100 )) cargo test -p hq-puller --test puller fuzz::hostile_batches
echo "fuzz: $cases cases per property passed"
