#!/usr/bin/env bash
# Instructions per uncontended critical section, counted by callgrind (repeatable on a
# noisy machine, unlike seconds): the common_path benchmark run twice under
# `valgrind --tool=callgrind`, with --ops 1000 and --ops 3000 (each plus its 10 %
# warm-up), on a redis-server of its own; the difference divided by the 2,200 extra
# sections (OPS=n for --ops n instead of 3000: more sections, less noise from the runtime's
# parking). Usage: [OPS=n] scripts/callgrind-common-path.sh [baseline,locker,layer]
set -euo pipefail
cd "$(dirname "$0")/.."

modes=${1:-baseline,locker,layer}
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install -y redis-server" >&2; exit 1; }

# Line tables only: function names in the profile, the same optimised code.
bench=$(CARGO_PROFILE_BENCH_DEBUG=line-tables-only cargo bench --bench common_path --no-run \
  --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*common_path[^"]*\)".*/\1/p' | tail -1)
[ -x "$bench" ] || { echo "could not build the common_path benchmark" >&2; exit 1; }

out=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
redis_pid=$!
trap 'kill "$redis_pid" 2>/dev/null; rm -rf "$out"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

instructions() { # mode ops
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1.$2" "$bench" \
    --scenario uncontended --mode "$1" --ops "$2" --redis-url "redis://127.0.0.1:$port" \
    >/dev/null 2>"$out/cg.$1.$2.err"
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out/cg.$1.$2.err"
}

for mode in ${modes//,/ }; do
  small=$(instructions "$mode" 1000)
  large=$(instructions "$mode" "${OPS:-3000}")
  echo "$mode: $(((large - small) * 10 / 11 / (${OPS:-3000} - 1000))) instructions per critical section"
done
