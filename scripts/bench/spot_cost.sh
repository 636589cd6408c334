#!/usr/bin/env bash
# Cost and makespan of a fixed training workload (8 data-parallel jobs, 208 instance-hours on
# on-demand) on the shipped 72-hour spot market trace, under three policies: all on-demand (the
# baseline), naive single-instance-type spot, and Flotilla's autoscaler. One JSON line per
# policy and a summary of ratios against on-demand; `spot_cost.sh SEED...` repeats with other
# interruption draws (default: 1 2 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin flotilla
bin="${CARGO_TARGET_DIR:-target}/release/flotilla"
for seed in "${@:-1 2 3}"; do
  for s in $seed; do
    "$bin" bench-spot-cost --trace examples/traces/us-east-1-gpu-72h.csv --seed "$s"
  done
done
