#!/usr/bin/env bash
# Runs the randomized convergence test over many seeds (default 10,000), split
# into shards that run side by side, and prints how many converged.
#   scripts/converge-soak.sh [SEEDS] [SHARDS]
# A failing seed is printed with the operations that led to it; rerun it alone
# with BRUME_CONVERGE_SEEDS=<seed> cargo test --test tests converge.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-10000}
shards=${2:-2}
cargo build --tests --quiet
bin=$(cargo test --test tests --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "tests" and m.get("executable"):
        print(m["executable"])')
logs=$(mktemp -d /tmp/brume-converge-XXXXXX)
start=$(date +%s)
pids=()
for ((s = 0; s < shards; s++)); do
  from=$((seeds * s / shards))
  to=$((seeds * (s + 1) / shards))
  BRUME_CONVERGE_SEEDS="$from..$to" "$bin" converge::random_owner_operations_converge_at_the_member --exact --nocapture \
    >"$logs/shard-$s.log" 2>&1 &
  pids+=($!)
done
failed=0
for ((s = 0; s < shards; s++)); do
  if ! wait "${pids[$s]}"; then
    failed=1
    echo "shard $s failed:"
    grep -E "did not converge|rerun with" "$logs/shard-$s.log" || tail -20 "$logs/shard-$s.log"
  fi
done
grep -h "seeds converged" "$logs"/shard-*.log || true
echo "$seeds seeds in $shards shards, $(($(date +%s) - start)) s; logs in $logs"
if [ "$failed" = 0 ]; then echo "all $seeds seeds converged"; fi
exit "$failed"
