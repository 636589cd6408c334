#!/usr/bin/env bash
# Recovery after preemption on the local cluster (release build): detection-to-resume after a
# SIGKILL, notice-to-resume after a spot notice, steps lost per preemption, checkpoint stall per
# save, and checkpoint write throughput against the disk's sequential write rate (dd, same run).
# One JSON line per measurement; `recovery.sh N` runs N rounds of each preemption (default 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
export FLOTILLA_BIN="${CARGO_TARGET_DIR:-target}/release/flotilla"
export WORK=$(mktemp -d)
export FLOTILLA_HOME="$WORK/.flotilla"
trap '"$FLOTILLA_BIN" down --purge >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
"$FLOTILLA_BIN" up --workers 3 >/dev/null
python3 scripts/bench/recovery.py "${1:-3}"
