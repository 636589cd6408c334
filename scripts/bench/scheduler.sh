#!/usr/bin/env bash
# Gang-scheduler placement time: 10,000 pending jobs on 1,000 free workers (4 pools, a quarter
# GPU jobs), median of 5 passes, against a naive scan-every-worker scheduler timed on the same
# input in the same run. One JSON line.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
"${CARGO_TARGET_DIR:-target}/release/flotilla" bench-scheduler --jobs "${1:-10000}" --workers "${2:-1000}"
