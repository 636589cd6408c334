#!/usr/bin/env bash
# All-reduce benchmark: TCP ring, world sizes 2 and 4 (threads on loopback), 4 KiB to 256 MiB.
# One JSON line per case: world, bytes, median_ms, algbw_GBps, busbw_GBps (= algbw*2(n-1)/n),
# and busbw_vs_loopback, the ratio to one loopback TCP stream measured in the same run.
#
#   scripts/bench/allreduce.sh [MAX_MIB]      (default 256)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
"${CARGO_TARGET_DIR:-target}/release/flotilla" bench-allreduce --max-mib "${1:-256}"
