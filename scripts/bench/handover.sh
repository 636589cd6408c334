#!/usr/bin/env bash
# The notice path with a replacement that takes time to boot (issue 25): today's
# checkpoint-and-wait (a 30 s notice, too short for a handover) against the handover (a 120 s
# notice: the gang trains on while the replacement boots), alternating on one local cluster of
# exactly one gang (2 workers, no spare), same release build, same run. One JSON line per
# notice (notice_path), then medians and the stall ratio (notice_path_summary).
# `handover.sh [ROUNDS] [BOOT_S]`: rounds per path (default 3), replacement boot time in
# seconds (default 10; EC2 takes 60-180). FLOTILLA_BIN=path uses a binary built elsewhere (no
# build); GPUS=1 makes the job ask for a GPU per worker (a `--features cuda` build on a GPU
# machine; the workers of one machine then share its GPUs). STORE=s3 puts the cluster store
# (checkpoints, job logs) on S3 (moto on loopback, started here) instead of the local disk.
# NOTICED=all gives every gang member the notice at once (a capacity pool reclaimed: each needs
# a replacement of its own); the default notices one member per round. LIVE=1 runs the cluster
# with `up --live-handover`: the 120 s path is then the live handover (no stop; see handover.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/build.sh # FLOTILLA_BIN or a release build
export FLOTILLA_BIN="$flotilla"
export GPUS="${GPUS:-0}"
export WORK=$(mktemp -d)
export FLOTILLA_HOME="$WORK/.flotilla"
trap '"$FLOTILLA_BIN" down --purge >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
export BOOT_S="${2:-10}"
store_args=()
if [[ "${STORE:-local}" == s3 ]]; then
  source scripts/moto.sh
  export AWS_ENDPOINT_URL="$FLOTILLA_MOTO_ENDPOINT" AWS_ENDPOINT="$FLOTILLA_MOTO_ENDPOINT" AWS_ALLOW_HTTP=true \
    AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_EC2_METADATA_DISABLED=true AWS_METADATA_ENDPOINT="http://127.0.0.1:9"
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/flotilla-bench", method="PUT"))' \
    "$FLOTILLA_MOTO_ENDPOINT"
  store_args=(--store s3://flotilla-bench/handover)
  trap '"$FLOTILLA_BIN" down --purge >/dev/null 2>&1 || true; rm -rf "$WORK"; kill "$moto_pid" 2>/dev/null || true' EXIT
fi
live_args=(--live-handover false)
if [[ "${LIVE:-0}" == 1 ]]; then
  live_args=(--live-handover true)
fi
"$FLOTILLA_BIN" up --workers 2 --boot-delay-s "$BOOT_S" "${store_args[@]}" "${live_args[@]}" > "$WORK/up.txt"
# The leader's metrics (one coordinator): its stall histograms time each stop from the inside.
export METRICS_URL=$(sed -n 's/^metrics: \(http[^ ]*\).*/\1/p' "$WORK/up.txt")
python3 scripts/bench/handover.py "${1:-3}"
