#!/usr/bin/env bash
# Training benchmark: MLP 784-512-512-10, batch 64 per worker, synthetic data, 1 and 2 workers
# (ranks joined by the TCP ring on loopback). One JSON line per world size: samples_s,
# median_step_ms, median_allreduce_ms and comm_fraction (time in the gradient exchange / step).
#
#   scripts/bench/train.sh [STEPS]      (default 100)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
"${CARGO_TARGET_DIR:-target}/release/flotilla" bench-train --steps "${1:-100}"
