#!/usr/bin/env bash
# Cost and makespan of a fixed training workload (8 data-parallel jobs, 208 instance-hours on
# on-demand) on every shipped spot market trace (examples/traces/*.csv), under four policies:
# all on-demand (the baseline), naive single-type spot, naive spot that moves to on-demand to
# finish within 1.25x on-demand's makespan, and Flotilla's autoscaler (and, to show what its
# correlated risk is worth, Flotilla with the long-run interruption rates alone; and Flotilla
# with mixed-type gangs, capacity.mixed_types, for every job). One JSON line per
# (trace, seed, policy) and a summary per (trace, seed); last, per trace, the medians over the
# seeds of every summary ratio. `spot_cost.sh SEED...` sets the seeds (default: 1 2 3 4 5).
# Also Flotilla without handovers (issue 25: every notice checkpoints and waits), for the stall
# per preemption with and without. PROVISION_MINUTES=N: launch-to-worker time (default 3);
# FLOTILLA_BIN=path: a binary built elsewhere (no build).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/build.sh # FLOTILLA_BIN or a release build
bin="$flotilla"
provision=${PROVISION_MINUTES:-3}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
seeds=("${@:-1 2 3 4 5}")
for trace in examples/traces/*.csv; do
  for seed in ${seeds[*]}; do
    "$bin" bench-spot-cost --trace "$trace" --seed "$seed" --provision-minutes "$provision" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by_trace = {}
for r in rows:
    if r["bench"] == "spot_cost_summary":
        by_trace.setdefault(r["trace"], []).append(r)
for trace, summaries in by_trace.items():
    keys = [k for k in summaries[0] if k not in ("bench", "trace", "seed")]
    line = {"bench": "spot_cost_median", "trace": trace, "seeds": len(summaries)}
    line.update({k: round(statistics.median(s[k] for s in summaries), 3) for k in keys})
    for policy in ("flotilla", "flotilla_uncorrelated", "flotilla_mixed_types", "naive_spot", "naive_spot_deadline"):
        runs = [r for r in rows if r["bench"] == "spot_cost" and r["trace"] == trace and r["policy"] == policy]
        line[f"{policy}_preemptions"] = statistics.median(r["preemptions"] for r in runs)
        line[f"{policy}_steps_lost"] = statistics.median(r["steps_lost"] for r in runs)
        line[f"{policy}_cost_vs_on_demand"] = round(statistics.median(
            r["cost_usd"] / next(o["cost_usd"] for o in rows if o["bench"] == "spot_cost" and o["trace"] == trace
                                 and o["seed"] == r["seed"] and o["policy"] == "on_demand") for r in runs), 3)
        line[f"{policy}_makespan_h"] = statistics.median(r["makespan_h"] for r in runs)
    print(json.dumps(line))
PY
