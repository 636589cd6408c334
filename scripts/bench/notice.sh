#!/usr/bin/env bash
# Spot notice -> the generation stopped at a checkpoint -> the next generation's first step, with
# the agent polling the metadata endpoint every 1000 ms (the old interval: the baseline) and every
# 100 ms (the default), on the same release build in the same run. One JSON line per round
# (recovery_notice, with imds_poll_ms), then one line of medians and their ratios.
# `notice.sh N` runs N rounds per interval (default 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
export FLOTILLA_BIN="${CARGO_TARGET_DIR:-target}/release/flotilla"
export WORK=$(mktemp -d)
export FLOTILLA_HOME="$WORK/.flotilla"
trap '"$FLOTILLA_BIN" down --purge >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
ROUNDS="${1:-5}"
for poll in 1000 100; do
  # The workers inherit the interval from `up` (through the coordinator's local provider).
  FLOTILLA_IMDS_POLL_MS=$poll "$FLOTILLA_BIN" up --workers 3 >/dev/null
  FLOTILLA_IMDS_POLL_MS=$poll python3 scripts/bench/recovery.py "$ROUNDS" notice | tee -a "$WORK/lines.jsonl"
  "$FLOTILLA_BIN" down --purge >/dev/null
done
python3 - "$WORK/lines.jsonl" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def median(poll, key):
    return statistics.median(l[key] for l in lines if l["imds_poll_ms"] == poll)
out = {"bench": "notice_poll_ab", "rounds": sum(1 for l in lines if l["imds_poll_ms"] == 100)}
for key in ("to_detection_ms", "to_first_step_ms"):
    base, new = median(1000, key), median(100, key)
    out[f"{key}_poll_1000"] = base
    out[f"{key}_poll_100"] = new
    out[f"{key}_ratio"] = round(new / base, 3)
print(json.dumps(out))
PY
