#!/usr/bin/env bash
# Runs Brume's whole test suite on a Debian 12 machine as root (what .ci/run calls).
# Installs what the tests need: FUSE 3, the programs the tests drive, pjdfstest
# and fsx. Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"

# One line per phase, with the time since the start, so a long step is never silent.
start=$SECONDS
phase() { printf '[run.sh %3ds] %s\n' "$((SECONDS - start))" "$*"; }

packages=(fuse3 rsync git tar python3 bindfs iproute2 faketime coturn nftables conntrack openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  phase "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v pjdfstest >/dev/null; then
  phase "installing pjdfstest 0.2.2 into ~/.cargo/bin (about a minute)"
  cargo install --locked --quiet pjdfstest@0.2.2
fi
if ! command -v fsx >/dev/null; then
  phase "installing fsx 0.3.2 into ~/.cargo/bin"
  cargo install --locked --quiet fsx@0.3.2
fi

# A test run killed half-way may have left mounts behind; they would break this one.
# Only dead ones (their daemon gone: "Transport endpoint is not connected") are
# detached, so that a soak running alongside keeps its mounts.
{ grep -oE ' [^ ]*brume-(test|sync)-[^ ]*/mnt ' /proc/mounts || true; } | while read -r m; do
  stat "$m" >/dev/null 2>&1 || fusermount3 -uz "$m" || true
done

# Network namespaces the netfault tests made, if a killed run left them behind.
{ ip netns list 2>/dev/null | grep -oE '^brume-t-[0-9]+-[0-9]+-[a-z]+' || true; } | while read -r ns; do
  ip netns del "$ns" || true
done

phase "building Brume and its tests (about 2 minutes on 2 cores from scratch)"
cargo build --tests --bins --quiet
phase "running the tests (about 3 minutes)"
status=0
cargo test --no-fail-fast -- --test-threads=2 || status=$?
phase "done: exit status $status"
exit "$status"
