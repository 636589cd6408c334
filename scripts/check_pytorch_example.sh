#!/usr/bin/env bash
# Runs examples/pytorch-ddp under Flotilla as a user would, with a spot notice in the middle,
# and checks the result against the same script run uninterrupted under torchrun.
#
# Not part of scripts/test.sh: it needs PyTorch (a 5 GB install from PyPI, CPU is enough).
#
#   scripts/check_pytorch_example.sh              # makes ./.venv-torch with torch on first use
#   TORCH_PYTHON=/path/to/python scripts/check_pytorch_example.sh   # a Python that has torch
#
# Checks: the job succeeds on a 2-worker local cluster (gloo); `flotilla preempt` mid-run gives a
# checkpoint at the stopped step, a second generation that resumes there, 0 steps lost; the final
# loss and validation accuracy equal torchrun's uninterrupted run exactly. Exits non-zero on any
# failure. About 2 minutes on 2 cores after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

source scripts/bench/torch_python.sh
bin_dir=$(dirname "$TORCH_PYTHON")

echo "==> building flotilla"
cargo build --quiet
flotilla="${CARGO_TARGET_DIR:-$root/target}/debug/flotilla"

work=$(mktemp -d)
cleanup() { (cd "$work" && "$flotilla" down --purge >/dev/null 2>&1) || true; rm -rf "$work"; }
trap cleanup EXIT
cp -r examples/pytorch-ddp "$work/"
sed -e 's/STEPS = "600", CHECKPOINT_EVERY = "100"/STEPS = "8000", CHECKPOINT_EVERY = "1000"/' \
  examples/pytorch-ddp.toml > "$work/job.toml"
grep -q 'STEPS = "8000"' "$work/job.toml" || { echo "error: examples/pytorch-ddp.toml changed its env line" >&2; exit 1; }

echo "==> the reference: torchrun --standalone, uninterrupted"
mkdir "$work/reference" && cp examples/pytorch-ddp/train.py "$work/reference/"
reference=$(cd "$work/reference" && PATH="$bin_dir:$PATH" STEPS=8000 CHECKPOINT_EVERY=1000 OMP_NUM_THREADS=1 \
  "$bin_dir/python" -m torch.distributed.run --standalone --nproc-per-node 2 train.py 2>/dev/null | tail -1)
echo "$reference"

echo "==> the same script as a Flotilla job, preempted mid-run"
cd "$work"
PATH="$bin_dir:$PATH" "$flotilla" up --workers 2 >/dev/null
job=$("$flotilla" submit job.toml | tail -1)
status() { "$flotilla" status "$job" -o json; }
field() { "$TORCH_PYTHON" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
for _ in $(seq 120); do
  step=$(status | field 'd.get("step") or 0')
  [[ "$step" -ge 1500 ]] && break
  sleep 0.5
done
victim=$("$flotilla" workers -o json | field '[w["id"] for w in d if w.get("job_id") == "'"$job"'"][-1]')
"$flotilla" preempt "$victim"
for _ in $(seq 600); do
  state=$(status | field 'd["state"]')
  [[ "$state" == Succeeded || "$state" == Failed ]] && break
  sleep 0.5
done
done_json=$(status)
echo "$done_json" | field '{k: d.get(k) for k in ["state", "step", "generation", "preemptions", "steps_lost", "metrics"]}'
"$flotilla" logs "$job" | grep -E 'notice|stopped at step|resum' || true

echo "$done_json" | REFERENCE="$reference" "$TORCH_PYTHON" -c '
import json, os, sys
done = json.load(sys.stdin)
ref = json.loads(os.environ["REFERENCE"])
metrics = done.get("metrics") or {}
checks = [
    (done["state"] == "Succeeded", "state %s" % done["state"]),
    (done.get("preemptions") == 1, "preemptions %s, expected 1" % done.get("preemptions")),
    (done.get("steps_lost", 0) == 0, "steps_lost %s" % done.get("steps_lost")),
    ((done.get("generation") or 0) >= 2, "no second generation"),
    (metrics.get("val_accuracy") == ref["val_accuracy"] and metrics.get("train_loss") == ref["loss"],
     "final metrics %s differ from the uninterrupted run %s" % (metrics, ref)),
]
problems = [why for ok, why in checks if not ok]
if problems:
    sys.exit("FAILED: " + "; ".join(problems))
print("ok: preempted, resumed with 0 steps lost; final loss and val_accuracy equal the uninterrupted torchrun run (%s)"
      % ref["val_accuracy"])
'
