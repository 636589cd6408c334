#!/usr/bin/env bash
# Batch-inference throughput on the local cluster (release build): rows/s with 1 worker and with
# 2 workers over the same input, against the in-process baseline (one process predicting every
# row with no leases, commits or output files) measured in the same run. One JSON line each.
# `infer.sh N` uses N copies of the 5,000 MNIST rows as the input (default 4: 20,000 rows).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/flotilla"
WORK=$(mktemp -d)
export FLOTILLA_HOME="$WORK/.flotilla"
trap '"$BIN" down --purge >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
COPIES="${1:-4}"
python3 - "$WORK" "$COPIES" <<'PY'
import gzip, sys
work, copies = sys.argv[1], int(sys.argv[2])
rows = [l for l in gzip.open("examples/data/mnist_5k.csv.gz", "rt").read().splitlines() if l.strip()]
open(f"{work}/train.csv", "w").write("".join(r + "\n" for i, r in enumerate(rows) if i % 5))
open(f"{work}/input.csv", "w").write("".join(r + "\n" for r in rows) * copies)
PY
cat > "$WORK/mlp.toml" <<TOML
name = "bench-infer"
model = { kind = "mlp", hidden = [256, 128] }
data = { train = "$WORK/train.csv", validation_fraction = 0.0 }
train = { epochs = 1, batch_size = 64 }
workers = { min = 1, max = 1 }
output = { register_as = "bench-infer" }
TOML
"$BIN" up --workers 2 >/dev/null
"$BIN" submit "$WORK/mlp.toml" --follow >/dev/null 2>&1
"$BIN" bench-infer --model bench-infer --input "$WORK/input.csv"
for workers in 1 2; do
  "$BIN" infer --model bench-infer --input "$WORK/input.csv" --output-prefix "$WORK/out-$workers" \
    --workers "$workers" -o json 2>/dev/null \
    | python3 -c '
import json, sys
job = json.loads(sys.stdin.read().strip().splitlines()[-1])
summary = json.load(open(job["output"].removeprefix("file://") + "/_SUMMARY.json"))
print(json.dumps({"bench": "infer_cluster", "workers": job["workers_max"], "rows": summary["rows"],
                  "shards": summary["shards"], "workers_used": len(summary["workers_used"]),
                  "seconds": summary["seconds"], "rows_per_s": summary["rows_per_s"],
                  "rows_per_s_per_worker": summary["rows_per_s"] / job["workers_max"]}))'
done
