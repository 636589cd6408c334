#!/usr/bin/env bash
# A prepared worker's warm-up (issue 25): how far a fresh process's first training step is from
# the steady step after 0, 1, 2 and 3 warm-up passes of the prepared worker's own code
# (`flotilla_worker::agent::warm_up`; the product runs WARM_UP_PASSES). Each measurement runs in
# a process of its own (a process warms once), passes interleaved round by round, world 1, same
# release build, same run. One JSON line per process (first_step_after_warm_up), then the
# medians per pass count (warm_up_summary).
#
#   scripts/bench/warm_up.sh [ROUNDS] [MODEL]      (defaults 3, cnn; MODEL mlp or cnn)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
model=${2:-cnn}
source scripts/bench/build.sh # FLOTILLA_BIN or a release build
FLOTILLA_BIN="$flotilla"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$rounds"); do
  for passes in 0 1 2 3; do
    "$FLOTILLA_BIN" bench-train --first-step-after "$passes" --model "$model" --steps 20 | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
summary = {"bench": "warm_up_summary", "model": lines[0]["model"], "rounds": len(lines) // 4,
           "product_passes": lines[0]["product_passes"]}
for passes in sorted({l["passes"] for l in lines}):
    mine = [l for l in lines if l["passes"] == passes]
    summary[f"passes_{passes}_first_step_ms"] = round(statistics.median(l["first_step_ms"] for l in mine), 1)
    summary[f"passes_{passes}_first_vs_steady"] = round(statistics.median(l["first_vs_steady"] for l in mine), 3)
print(json.dumps(summary))
PY
