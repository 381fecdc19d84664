#!/usr/bin/env bash
# Runs the whole test suite (tests/run.sh) several times in a row with busy loops
# beside it, as a loaded CI machine would, and prints each run's result.
#   scripts/suite-under-load.sh [RUNS] [BUSY_LOOPS]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
loops=${2:-2}
logs=$(mktemp -d /tmp/brume-load-XXXXXX)
failed=0
for ((i = 1; i <= runs; i++)); do
  busy=()
  for ((j = 0; j < loops; j++)); do
    sh -c 'while :; do :; done' &
    busy+=($!)
  done
  start=$(date +%s)
  bash tests/run.sh >"$logs/run-$i.log" 2>&1
  rc=$?
  kill "${busy[@]}" 2>/dev/null
  wait "${busy[@]}" 2>/dev/null
  echo "run $i of $runs with $loops busy loops: exit $rc after $(($(date +%s) - start)) s"
  grep -E "^test result" "$logs/run-$i.log" | grep -v " 0 passed; 0 failed" || true
  grep -E "^test .* FAILED|panicked at" "$logs/run-$i.log" | head -5 || true
  [ "$rc" = 0 ] || failed=1
done
echo "logs in $logs"
exit "$failed"
