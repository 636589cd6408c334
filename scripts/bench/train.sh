#!/usr/bin/env bash
# Training benchmark: MLP 784-512-512-10, Adam, batch 64 per worker, synthetic data, 1 and 2
# workers (ranks joined by the TCP ring on loopback). One JSON line per world size: samples_s,
# median_step_ms, median_allreduce_ms and comm_fraction (time in the gradient exchange / step).
# Then the same step under PyTorch DDP (gloo, 2 processes; ddp_train.py: its exposed
# communication, 1 - step without sync / step with sync), passes alternating with Flotilla's
# 2-rank run, and a "train_compare" line with the medians over the passes and the ratios.
#
#   scripts/bench/train.sh [STEPS] [PASSES]      (defaults 100, 3)
#   TORCH_PYTHON=/path/to/python: a Python with torch; otherwise ./.venv-torch is made on first
#   use (pip install torch, about 5 GB); FLOTILLA_BENCH_NO_DDP=1 measures Flotilla alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-100}
passes=${2:-3}
cargo build --release --quiet
flotilla="${CARGO_TARGET_DIR:-target}/release/flotilla"
"$flotilla" bench-train --steps "$steps"
[[ -n "${FLOTILLA_BENCH_NO_DDP:-}" ]] && exit 0

source scripts/bench/torch_python.sh
python=$TORCH_PYTHON
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$passes"); do
  "$flotilla" bench-train --steps "$steps" --worlds 2 | sed 's/^{/{"impl":"flotilla_ring",/' | tee -a "$out"
  OMP_NUM_THREADS=1 "$python" scripts/bench/ddp_train.py "$steps" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def median(impl, key):
    return statistics.median(r[key] for r in rows if r.get("impl") == impl)
ours, ddp = median("flotilla_ring", "comm_fraction"), median("torch_ddp_gloo", "comm_fraction")
print(json.dumps({
    "bench": "train_compare", "world": 2, "passes": len(rows) // 2,
    "flotilla_comm_fraction": round(ours, 3), "ddp_comm_fraction": round(ddp, 3),
    "comm_fraction_vs_ddp": round(ours / ddp, 2),
    "samples_s_vs_ddp": round(median("flotilla_ring", "samples_s") / median("torch_ddp_gloo", "samples_s"), 2),
}))
PY
