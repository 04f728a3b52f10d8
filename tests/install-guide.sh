#!/usr/bin/env bash
# Follows deploy/INSTALL.md to the letter against the built binaries, in a temporary root.
#
#   tests/install-guide.sh [--keep] [--simulate-users]
#
# It extracts the guide's blocks marked `sh install-guide=NAME`, in document order, and
# runs them in one bash (set -euo pipefail) with these substitutions, and nothing else:
#   - paths: /etc/, /var/lib/ and /usr/local/bin/ are moved under the temporary root;
#     the listener's port 7070 becomes a free port;
#   - the working directory is a stand-in checkout: deploy/ is this repository's,
#     target/release/ holds the built binaries ($CARGO_TARGET_DIR/debug by default,
#     INSTALL_GUIDE_BIN to choose);
#   - `sudo -u postgres createuser/createdb` run against a throwaway PostgreSQL cluster
#     in the root (tests/pg.sh); `sudo CMD` runs CMD as root, `sudo -u USER CMD` as USER;
#   - `systemctl enable --now|start|stop UNIT` runs the installed unit file instead of
#     systemd: its ExecStartPre= lines, then ExecStart= in the background as its User=
#     with its Environment= and a NOTIFY_SOCKET, waiting for READY=1 (Type=notify);
#     stop sends SIGTERM and expects exit 0;
#   - the by-hand edits of a step (config values, copying the token from HQ, the
#     application creating its database and writing) are made by hooks below.
# As root, users are created for real (useradd; removed again at the end) and the
# services run as them; otherwise (or with --simulate-users) useradd/chown/owners are
# skipped and everything runs as the current user. File modes are checked either way.
# Ends with "install guide: OK" or "install guide: FAILED ..." (exit 1).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
keep=0
real_users=0
[ "$(id -u)" = 0 ] && real_users=1
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1; shift ;;
    --simulate-users) real_users=0; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-guide: unknown option $1" >&2; exit 2 ;;
  esac
done
target=${CARGO_TARGET_DIR:-$repo/target}
bin=${INSTALL_GUIDE_BIN:-$target/debug}
for b in hq-puller branch-listener pm-sim; do
  [ -x "$bin/$b" ] || { echo "install-guide: $bin/$b missing (cargo build --workspace --bins)" >&2; exit 1; }
done
for c in curl python3 psql setpriv; do
  command -v "$c" >/dev/null || { echo "install-guide: $c is needed" >&2; exit 1; }
done

ROOT=$(mktemp -d /tmp/install-guide.XXXXXX)
chmod 0755 "$ROOT"
started=$(date +%s)
# What a fresh Debian has: the folders the guide installs into.
mkdir -p "$ROOT/checkout/target" "$ROOT/run" "$ROOT/etc/systemd/system" "$ROOT/var/lib" "$ROOT/usr/local/bin"
ln -s "$repo/deploy" "$ROOT/checkout/deploy"
ln -s "$bin" "$ROOT/checkout/target/release"
export ROOT real_users repo bin

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
BRANCH_PORT=$(free_port)
METRICS_PORT=$(free_port)
ADMIN_PORT=$(free_port)

# The throwaway PostgreSQL of this run, in the root.
export TEST_PG_DIR=$ROOT/pg
PG_URL=$("$repo/tests/pg.sh" ensure)
PG_PORT=$(echo "$PG_URL" | sed -E 's#.*:([0-9]+)/.*#\1#')
export PGHOST=127.0.0.1 PGPORT=$PG_PORT PGUSER=postgres

cleanup() {
  local rc=$?
  set +e
  local pids=() pidf i
  for pidf in "$ROOT"/run/*.pid; do
    [ -f "$pidf" ] && pids+=("$(cat "$pidf")")
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null
    for i in $(seq 100); do kill -0 "${pids[@]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${pids[@]}" 2>/dev/null
  fi
  "$repo/tests/pg.sh" stop >/dev/null 2>&1
  if [ -f "$ROOT/created-users" ]; then
    while read -r u; do userdel "$u" 2>/dev/null; groupdel "$u" 2>/dev/null; done <"$ROOT/created-users"
  fi
  if [ "$rc" != 0 ]; then
    echo "install guide: FAILED after $(( $(date +%s) - started ))s (root kept: $ROOT)" >&2
    for log in "$ROOT"/run/*.log; do
      [ -f "$log" ] && { echo "--- $log (tail)"; tail -n 20 "$log"; } >&2
    done
  elif [ "$keep" = 1 ]; then
    echo "install-guide: kept $ROOT"
  else
    rm -rf "$ROOT"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the guide's blocks ---------------------------------------------------------------------
rewrite() {
  sed -e "s#/etc/#$ROOT/etc/#g" -e "s#/var/lib/#$ROOT/var/lib/#g" \
      -e "s#/usr/local/bin/#$ROOT/usr/local/bin/#g" -e "s#127.0.0.1:7070#127.0.0.1:$BRANCH_PORT#g"
}
mkdir -p "$ROOT/guide"
awk -v out="$ROOT/guide" '
  match($0, /^ *```sh install-guide=[a-z0-9-]+ *$/) {
    indent = index($0, "`") - 1; name = $0; sub(/^ *```sh install-guide=/, "", name); sub(/ *$/, "", name)
    n++; file = sprintf("%s/%02d-%s.sh", out, n, name); inblock = 1; next
  }
  inblock && /^ *``` *$/ { inblock = 0; close(file); next }
  inblock { print substr($0, indent + 1) > file }
' "$repo/deploy/INSTALL.md"
blocks=("$ROOT"/guide/*.sh)
[ ${#blocks[@]} -ge 8 ] || { echo "install-guide: found only ${#blocks[@]} marked blocks in deploy/INSTALL.md" >&2; exit 1; }

# --- stand-ins for sudo, users and systemd (used by the blocks) -----------------------------
as_user() { # as_user USER CMD...: runs CMD as USER (exec-style, so signals reach it)
  local u=$1; shift
  if [ "$real_users" = 1 ] && [ "$u" != root ]; then
    setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups -- \
      env HOME="$(getent passwd "$u" | cut -d: -f6)" USER="$u" "$@"
  else
    "$@"
  fi
}
exec_as_user() { # like as_user, replacing the current (sub)shell
  local u=$1; shift
  if [ "$real_users" = 1 ] && [ "$u" != root ]; then
    exec setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups -- \
      env HOME="$(getent passwd "$u" | cut -d: -f6)" USER="$u" "$@"
  fi
  exec "$@"
}
sudo() {
  local u=root
  if [ "$1" = -u ]; then u=$2; shift 2; fi
  if [ "$u" = postgres ]; then "$@"; return; fi   # createuser/createdb: the test cluster
  if [ "$u" = root ] || [ "$(type -t "$1")" = function ]; then "$@"; else as_user "$u" "$@"; fi
}
useradd() {
  local u=${*: -1}
  if [ "$real_users" = 1 ]; then
    if id "$u" >/dev/null 2>&1; then
      echo "install-guide: user $u exists already (a previous run?), using it"
    else
      command useradd "$@" && echo "$u" >>"$ROOT/created-users"
    fi
  else
    echo "install-guide: (simulated) useradd $u"
  fi
}
chown() { if [ "$real_users" = 1 ]; then command chown "$@"; fi; }
install() {
  if [ "$real_users" = 1 ]; then command install "$@"; return; fi
  local args=()
  while [ $# -gt 0 ]; do
    case "$1" in -o|-g) shift 2 ;; *) args+=("$1"); shift ;; esac
  done
  command install "${args[@]}"
}
unit_value() { grep -E "^$2=" "$ROOT/etc/systemd/system/$1.service" | sed -E "s/^$2=//" | rewrite; }
start_unit() {
  local unit=$1 file="$ROOT/etc/systemd/system/$1.service"
  [ -f "$file" ] || { echo "install-guide: unit $unit is not installed in /etc/systemd/system" >&2; return 1; }
  grep -qx 'Type=notify' "$file" || { echo "install-guide: $unit is not Type=notify" >&2; return 1; }
  local user env=() line
  user=$(unit_value "$unit" User)
  [ "$real_users" = 1 ] || user=root
  while read -r line; do [ -n "$line" ] && env+=("$line"); done < <(unit_value "$unit" Environment)
  while read -r line; do
    [ -n "$line" ] || continue
    echo "install-guide: $unit ExecStartPre: $line"
    # shellcheck disable=SC2086
    as_user "$user" env "${env[@]}" $line >>"$ROOT/run/$unit.log" 2>&1 \
      || { echo "install-guide: ExecStartPre failed: $line" >&2; tail -n 20 "$ROOT/run/$unit.log" >&2; return 1; }
  done < <(unit_value "$unit" ExecStartPre)
  local sock="$ROOT/run/$unit.notify"
  rm -f "$sock" "$ROOT/run/$unit.ready"
  python3 - "$sock" "$ROOT/run/$unit.ready" <<'PY' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); s.settimeout(60)
while True:
    msg = s.recv(4096).decode()
    if "READY=1" in msg.split("\n"):
        open(sys.argv[2], "w").write(msg)
        break
PY
  local listener=$!
  while [ ! -S "$sock" ]; do sleep 0.05; done
  # exec: the background job becomes the service itself, so SIGTERM reaches it.
  # shellcheck disable=SC2046
  (exec_as_user "$user" env "${env[@]}" NOTIFY_SOCKET="$sock" $(unit_value "$unit" ExecStart)) \
    >>"$ROOT/run/$unit.log" 2>&1 &
  echo $! >"$ROOT/run/$unit.pid"
  if ! wait "$listener" || [ ! -f "$ROOT/run/$unit.ready" ]; then
    echo "install-guide: $unit sent no READY=1 within 60 s" >&2; return 1
  fi
  echo "install-guide: $unit is running (pid $(cat "$ROOT/run/$unit.pid"), READY=1 received)"
}
stop_unit() {
  local pidf="$ROOT/run/$1.pid"
  [ -f "$pidf" ] || { echo "install-guide: $1 is not running" >&2; return 1; }
  local pid rc=0
  pid=$(cat "$pidf")
  kill -TERM "$pid"
  wait "$pid" || rc=$?
  rm -f "$pidf"
  [ "$rc" = 0 ] || { echo "install-guide: $1 exited $rc on SIGTERM" >&2; return 1; }
  echo "install-guide: $1 stopped cleanly"
}
systemctl() {
  case "$1" in
    daemon-reload) ;;
    enable) [ "$2" = --now ] && start_unit "$3" ;;
    start) start_unit "$2" ;;
    stop) stop_unit "$2" ;;
    *) echo "install-guide: systemctl $* is not simulated" >&2; return 1 ;;
  esac
}

# --- the by-hand parts of the steps, and checks ----------------------------------------------
branch_db=$ROOT/var/lib/branch/pm.db
mode_is() { # mode_is MODE FILE...
  local m=$1 f; shift
  for f in "$@"; do
    [ "$(stat -c %a "$f")" = "$m" ] || { echo "install-guide: $f has mode $(stat -c %a "$f"), not $m" >&2; return 1; }
  done
}
owner_is() { # owner_is USER FILE...
  [ "$real_users" = 1 ] || return 0
  local u=$1 f; shift
  for f in "$@"; do
    [ "$(stat -c %U "$f")" = "$u" ] || { echo "install-guide: $f is owned by $(stat -c %U "$f"), not $u" >&2; return 1; }
  done
}
post_hq_config() { # the operator edits the copied config
  local c=$ROOT/etc/hq-puller/config.toml
  sed -i -e "s#/etc/#$ROOT/etc/#g" -e "s#/var/lib/#$ROOT/var/lib/#g" \
    -e "s#^database_url = .*#database_url = \"postgres://hq_puller@127.0.0.1:$PG_PORT/hq\"#" \
    -e "s#^metrics_listen = .*#metrics_listen = \"127.0.0.1:$METRICS_PORT\"#" \
    -e "s#^admin_listen = .*#admin_listen = \"127.0.0.1:$ADMIN_PORT\"#" \
    -e "s#http://b07.branches.example.internal:7070#http://127.0.0.1:$BRANCH_PORT#" "$c"
  mode_is 640 "$c"
}
post_hq_tokens() {
  mode_is 600 "$ROOT"/etc/hq-puller/tokens/b*
  owner_is hq-puller "$ROOT"/etc/hq-puller/tokens/b*
  [ "$(ls "$ROOT"/etc/hq-puller/tokens | wc -l)" = 46 ]
}
post_hq_start() {
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/" >"$ROOT/run/dashboard.html"
  [ "$(grep -o '<tr class="location"' "$ROOT/run/dashboard.html" | wc -l)" = 46 ] \
    || { echo "install-guide: the dashboard does not list 46 locations" >&2; return 1; }
  curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" >"$ROOT/run/metrics.txt"
  grep -q '^hq_puller_location_state{location="b46"' "$ROOT/run/metrics.txt" \
    || { echo "install-guide: /metrics lacks the locations" >&2; return 1; }
}
post_branch_config() { # the operator edits the copied config
  local c=$ROOT/etc/branch-listener/config.toml
  mode_is 640 "$c"
  sed -i -e "s#/etc/#$ROOT/etc/#g" -e "s#/var/lib/#$ROOT/var/lib/#g" \
    -e "s#^listen = .*#listen = \"127.0.0.1:$BRANCH_PORT\"#" "$c"
}
pre_branch_token() { # the token file copied over from HQ
  cp "$ROOT/etc/hq-puller/tokens/b07" b07.token
}
post_branch_token() {
  mode_is 600 "$ROOT/etc/branch-listener/token"
  owner_is branch-listener "$ROOT/etc/branch-listener/token"
}
pre_branch_install() { # the application and its database exist before the listener
  as_user branch-listener "$bin/pm-sim" seed --db "sqlite://$branch_db" --products 0 >/dev/null
}
pre_hq_first_pull() { # the application writes: products through the capture triggers
  as_user branch-listener "$bin/pm-sim" seed --db "sqlite://$branch_db" --products 25 --seed 8 >/dev/null
}
post_hq_first_pull() {
  local n
  n=$(psql -d hq -tAc "SELECT count(*) FROM hq.products_live WHERE location_id = 'b07'")
  [ "$n" = 25 ] || { echo "install-guide: HQ holds $n products of b07, not 25" >&2; return 1; }
  "$bin/pm-sim" verify --hq "postgres://postgres@127.0.0.1:$PG_PORT/hq" --location b07 \
    --db "sqlite://$branch_db" --time-zone Europe/Berlin
}
post_upgrade() { # after the upgrade: updates and deletes replicate too
  as_user branch-listener "$bin/pm-sim" run --db "sqlite://$branch_db" --ops 50 --seed 9 \
    --mix new=10,price=40,stock=35,delete=5 --progress 0 >/dev/null
  as_user hq-puller env HQ_PULLER_CONFIG="$ROOT/etc/hq-puller/config.toml" "$ROOT/usr/local/bin/hq-puller" pull b07
  "$bin/pm-sim" verify --hq "postgres://postgres@127.0.0.1:$PG_PORT/hq" --location b07 \
    --db "sqlite://$branch_db" --time-zone Europe/Berlin
}

export HQ_PULLER_CONFIG=$ROOT/etc/hq-puller/config.toml
export BRANCH_LISTENER_CONFIG=$ROOT/etc/branch-listener/config.toml
export PATH=$ROOT/usr/local/bin:$PATH
cd "$ROOT/checkout"
for block in "${blocks[@]}"; do
  name=$(basename "$block" .sh); name=${name#*-}
  hook=${name//-/_}
  echo "==> install guide: $name"
  if [ "$(type -t "pre_$hook")" = function ]; then "pre_$hook"; fi
  rewrite <"$block" >"$block.run"
  # shellcheck disable=SC1090
  source "$block.run"
  if [ "$(type -t "post_$hook")" = function ]; then "post_$hook"; fi
done
echo "==> stopping the services"
systemctl stop hq-puller
systemctl stop branch-listener
echo "install guide: OK in $(( $(date +%s) - started ))s ($([ "$real_users" = 1 ] && echo "real users" || echo "simulated users"))"
