#!/usr/bin/env bash
# Runs every test of the crate (unit, integration against real Redis servers the tests
# spawn themselves, doc-tests). Installs redis-server first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    as_root=()
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null 2>&1 || { echo "redis-server is missing; run: sudo apt-get install -y redis-server redis-tools" >&2; exit 1; }
      as_root=(sudo)
    fi
    echo "redis-server is missing: installing it with apt-get" >&2
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq redis-server redis-tools >/dev/null
  else
    echo "redis-server is missing and apt-get is not available: install Redis 7 (e.g. 'brew install redis') and retry" >&2
    exit 1
  fi
fi
redis-server --version >&2

cargo test --all-features "$@"
