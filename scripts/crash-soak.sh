#!/usr/bin/env bash
# Crash-consistency soak: runs the kill -9 test of tests/crash.rs with at least
# 1,000 kill points (the test suite runs 100) and prints the count, the seeds, the
# time taken and the result. Needs what tests/run.sh installs (FUSE 3) and root
# for kernel passthrough; every mount and process is cleaned up by the test.
#
#   scripts/crash-soak.sh [POINTS] [FIRST_SEED]
#
# POINTS defaults to $BRUME_CRASH_POINTS or 1000; FIRST_SEED to $BRUME_CRASH_SEED
# or one taken from the clock. Kill point i uses seed FIRST_SEED + i, so a failure
# is rerun with the same two numbers. Exits non-zero if the soak fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

points=${1:-${BRUME_CRASH_POINTS:-1000}}
seed=${2:-${BRUME_CRASH_SEED:-$(($(date +%s) % 1000000000))}}
test=crash::kill9_at_random_points_keeps_every_acknowledged_version
log=$(mktemp -t brume-crash-soak.XXXXXX)

echo "crash soak: $points kill points, seeds $seed..$((seed + points - 1)), log $log"
cargo build --tests --bins --quiet
start=$(date +%s)
rc=0
BRUME_CRASH_POINTS=$points BRUME_CRASH_SEED=$seed \
  cargo test --quiet --test tests "$test" -- --exact --test-threads=1 --nocapture \
  >"$log" 2>&1 || rc=$?
elapsed=$(($(date +%s) - start))

grep -E '^crash:' "$log" || true
if [ "$rc" -eq 0 ]; then
  echo "crash soak: PASS, $points kill points in ${elapsed}s (seeds $seed..$((seed + points - 1)))"
else
  grep -E -A12 'panicked at|FAILED at' "$log" | grep -vE '^ +[0-9]+:|^ +at ' || tail -n 40 "$log"
  echo "crash soak: FAIL after ${elapsed}s (seeds $seed..$((seed + points - 1)); full output in $log)"
fi
exit "$rc"
