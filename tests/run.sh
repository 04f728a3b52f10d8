#!/usr/bin/env bash
# THE test command: formatting, lints, build, and every test of the workspace
# (unit, integration and end-to-end tests against real processes, a real PostgreSQL
# and real SQLite files). README and .ci/run call exactly this.
#
#   tests/run.sh
#
# Environment:
#   CARGO_TARGET_DIR   where cargo builds (default: target/); the end-to-end tests find
#                      branch-listener and hq-puller next to their own test binary.
#   TEST_PG_DIR        folder of the throwaway PostgreSQL cluster of this run
#                      (default: $CARGO_TARGET_DIR/test-pg-run); stopped at exit.
#   RUN_SKIP_LINT=1    skip fmt and clippy (quick local iterations).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
started=$(date +%s)
target=${CARGO_TARGET_DIR:-$root/target}
export TEST_PG_DIR=${TEST_PG_DIR:-$target/test-pg-run}

step() { printf '\n==> %s\n' "$*"; }
fail() {
  local s=$(( $(date +%s) - started ))
  printf '\nFAILED: %s (after %ss)\n' "$*" "$s" >&2
  exit 1
}

# --- 1. system packages: installed only when absent -------------------------------------
have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_sqlite() { command -v sqlite3 >/dev/null 2>&1; }
have_chromium() { command -v chromium >/dev/null 2>&1; }
missing=()
have_pg || missing+=(postgresql)
have_sqlite || missing+=(sqlite3)
have_chromium || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing missing system packages: ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then
    fail "missing system packages: ${missing[*]}; install them as root: apt-get install -y ${missing[*]}"
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update"
  apt-get install -y -qq "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]}"
fi
command -v cargo >/dev/null || fail "cargo not found (install Rust: https://rustup.rs)"
# The dashboard test renders in headless Chromium: here it must run, never skip.
export TESTS_REQUIRE_CHROMIUM=1

# --- 2. formatting and lints ---------------------------------------------------------------
if [ "${RUN_SKIP_LINT:-0}" != 1 ]; then
  step "cargo fmt --all -- --check"
  cargo fmt --all -- --check || fail "formatting (run: cargo fmt --all)"
  step "cargo clippy --workspace --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets -- -D warnings || fail "clippy"
fi

# --- 3. throwaway PostgreSQL, stopped at exit ----------------------------------------------
step "starting the throwaway PostgreSQL cluster in $TEST_PG_DIR"
cleanup() { "$root/tests/pg.sh" stop >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
TEST_PG_URL=$("$root/tests/pg.sh" ensure) || fail "starting PostgreSQL (tests/pg.sh ensure)"
export TEST_PG_URL
echo "TEST_PG_URL=$TEST_PG_URL"

# --- 4. build the binaries the end-to-end tests spawn, then test --------------------------
step "cargo build --workspace --bins"
cargo build --workspace --bins || fail "build"
step "cargo test --workspace"
cargo test --workspace || fail "tests"
step "tests/install-guide.sh (deploy/INSTALL.md, step by step, in a temporary root)"
"$root/tests/install-guide.sh" || fail "install guide"

printf '\nOK: fmt, clippy, build and all tests passed in %ss\n' $(( $(date +%s) - started ))
