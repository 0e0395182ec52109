#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS each, default 30),
# starting from the corpus kept in fuzz/corpus/<target>/. New inputs go to a temporary
# directory, so a run leaves the repository as it was; a crash fails the script and
# leaves its input in fuzz/artifacts/<target>/ (keep it as a regression test, see README).
# Needs a nightly toolchain (libFuzzer's instrumentation); without one it says so and
# skips. Installs cargo-fuzz when it is missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-30}

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "skipped: cargo fuzz needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: installing it" >&2
  cargo install cargo-fuzz --locked
fi

cargo fmt --check
# Safe Rust all the way down: no sanitizer, which builds and runs several times faster.
cargo +nightly fuzz build --sanitizer none

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "$scratch/$target" "corpus/$target"
  printf '\n--> fuzz target %s, %s s\n' "$target" "$seconds" >&2
  cargo +nightly fuzz run --sanitizer none "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 2>"$scratch/$target.log" || {
    cat "$scratch/$target.log" >&2
    exit 1
  }
  grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)' "$scratch/$target.log" >&2
done
