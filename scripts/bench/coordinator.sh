#!/usr/bin/env bash
# Coordinator benchmark: committed submissions/s and p50/p99 latency at 1 and 16 concurrent
# clients on a 3-node loopback cluster (fsync on every Ready), then leader failover time
# (SIGKILL of the leader -> next acknowledged write). One JSON line per case on stdout.
#
#   scripts/bench/coordinator.sh [OPS]        (default OPS=2000)
set -euo pipefail
cd "$(dirname "$0")/../.."
ops="${1:-2000}"
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/flotilla"
work=$(mktemp -d)
export FLOTILLA_HOME="$work/.flotilla"
trap '"$bin" down --purge >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

"$bin" up --coordinators 3 >/dev/null
"$bin" bench-submit --clients 1 --ops "$((ops / 4))" >/dev/null   # warm-up
for clients in 1 16; do
  "$bin" bench-submit --clients "$clients" --ops "$ops"
done
for round in 1 2 3; do
  "$bin" bench-submit --kill-leader
  "$bin" down >/dev/null
  "$bin" up --coordinators 3 >/dev/null
done
