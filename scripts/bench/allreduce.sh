#!/usr/bin/env bash
# All-reduce benchmark: Flotilla's TCP ring against gloo (PyTorch's CPU collective backend) on
# the same machine in the same run. World sizes 2 and 4 (ranks on loopback), float32 sums from
# 4 KiB to MAX_MIB. Passes alternate ring, gloo, ring, gloo, ... so both see the same machine.
#
# One JSON line per (impl, pass, world, size): median_ms, algbw_GBps, busbw_GBps (= algbw *
# 2(n-1)/n, the figure NCCL and gloo report); a loopback_tcp line (one TCP stream, the wire's
# speed here); then one "compare" line per (world, size) with each side's median over the passes
# and ring/gloo; last, a "summary" line per world with the lowest ratio over 1 MiB and up.
#
#   scripts/bench/allreduce.sh [MAX_MIB] [PASSES]      (defaults 256, 3)
#   TORCH_PYTHON=/path/to/python: a Python with torch; otherwise ./.venv-torch is made on first
#   use (pip install torch, about 5 GB); FLOTILLA_BENCH_NO_GLOO=1 measures the ring alone;
#   FLOTILLA_BIN=path measures a binary built elsewhere (no build).
set -euo pipefail
cd "$(dirname "$0")/../.."
max_mib=${1:-256}
passes=${2:-3}
source scripts/bench/build.sh # FLOTILLA_BIN or a release build

python=""
if [[ -z "${FLOTILLA_BENCH_NO_GLOO:-}" ]]; then
  source scripts/bench/torch_python.sh
  python=$TORCH_PYTHON
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
for pass in $(seq "$passes"); do
  "$flotilla" bench-allreduce --max-mib "$max_mib" | sed "s/^{/{\"impl\":\"flotilla_ring\",\"pass\":$pass,/" | tee -a "$out"
  if [[ -n "$python" ]]; then
    OMP_NUM_THREADS=1 "$python" scripts/bench/gloo_allreduce.py --max-mib "$max_mib" \
      | sed "s/^{/{\"pass\":$pass,/" | tee -a "$out"
  fi
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
cases = {}
for r in rows:
    if r.get("bench") == "allreduce":
        cases.setdefault((r["world"], r["bytes"]), {}).setdefault(r["impl"], []).append(r["busbw_GBps"])
lowest = {}
for (world, size), by in sorted(cases.items()):
    ring = statistics.median(by["flotilla_ring"])
    line = {"bench": "allreduce_compare", "world": world, "bytes": size, "ring_busbw_GBps": round(ring, 3)}
    if "gloo" in by:
        gloo = statistics.median(by["gloo"])
        line.update(gloo_busbw_GBps=round(gloo, 3), ring_vs_gloo=round(ring / gloo, 2))
        if size >= 1 << 20:
            lowest[world] = min(lowest.get(world, 9e9), ring / gloo)
    print(json.dumps(line))
for world, ratio in sorted(lowest.items()):
    print(json.dumps({"bench": "allreduce_summary", "world": world, "min_ring_vs_gloo_1MiB_up": round(ratio, 2)}))
PY
