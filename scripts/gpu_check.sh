#!/usr/bin/env bash
# The GPU check: one script for a machine with NVIDIA GPUs (no network needed once the crates
# are fetched). Builds flotilla with `--features cuda`, then:
#   1. probes the GPUs (driver, NVRTC, device count) - on a machine without one it prints why
#      and exits 2 ("no GPU": nothing to check, not a failure of the code);
#   2. NCCL all-reduce over every GPU, 1-256 MiB (JSON: world, bytes, busbw_GBps);
#   3. burn-cuda MLP and CNN steps vs the CPU in the same run (JSON: samples/s, ratio);
#   4. end to end: `flotilla train` of examples/mnist-mlp.toml on 1 GPU must reach >= 0.90
#      validation accuracy.
# Exits 0 when every check passed, 2 when there is no GPU, 1 on any failure. JSON lines go to
# stdout and to $OUT/gpu_check.jsonl when OUT is set.
#
#   scripts/gpu_check.sh                       # release build (the figures to quote)
#   FLOTILLA_PROFILE=dev scripts/gpu_check.sh  # faster build, for checking the script itself
#   FLOTILLA_BIN=path/flotilla scripts/gpu_check.sh
#       # a binary built elsewhere with `--features cuda` (a GPU machine without the crates or
#       # the network to fetch them): no build here. libcuda/libnvrtc/libnccl load at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$(date +%s)
out=${OUT:-}
log() { printf '==> %s (%ss)\n' "$*" "$(( $(date +%s) - started ))" >&2; }
emit() { echo "$1"; if [[ -n "$out" ]]; then echo "$1" >> "$out/gpu_check.jsonl"; fi; }

profile=${FLOTILLA_PROFILE:-release}
if [[ -n "${FLOTILLA_BIN:-}" ]]; then
  bin=$FLOTILLA_BIN
  [[ -x "$bin" ]] || { log "FAILED: FLOTILLA_BIN=$bin is not an executable"; exit 1; }
  log "using $bin (no build)"
elif [[ "$profile" == release ]]; then
  log "building flotilla with --features cuda (release)"
  cargo build --release --locked --features cuda
  bin="${CARGO_TARGET_DIR:-$root/target}/release/flotilla"
else
  log "building flotilla with --features cuda ($profile)"
  cargo build --locked --features cuda
  bin="${CARGO_TARGET_DIR:-$root/target}/debug/flotilla"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi

log "GPU probe, NCCL all-reduce, GPU vs CPU steps"
set +e
bench=$("$bin" bench-gpu)
status=$?
set -e
while IFS= read -r line; do [[ -n "$line" ]] && emit "$line"; done <<< "$bench"
if [[ $status -eq 2 ]]; then
  log "no GPU: $(sed -n 's/.*"reason":"\([^"]*\)".*/\1/p' <<< "$bench")"
  exit 2
fi
if [[ $status -ne 0 ]]; then
  log "FAILED: bench-gpu exited with $status"
  exit 1
fi

log "end to end: flotilla train on 1 GPU (examples/mnist-mlp.toml)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r examples/data "$work/data"
sed -e 's/^min = 2$/min = 1/' -e 's/^max = 2$/max = 1\ngpus = 1/' examples/mnist-mlp.toml > "$work/mnist-gpu.toml"
grep -q '^gpus = 1$' "$work/mnist-gpu.toml" || { log "FAILED: examples/mnist-mlp.toml changed its [workers] lines"; exit 1; }
summary=$("$bin" train "$work/mnist-gpu.toml" -o json | tail -1)
emit "$(printf '{"bench":"gpu_train_e2e","summary":%s}' "$summary")"
accuracy=$(sed -n 's/.*"val_accuracy":\([0-9.eE+-]*\).*/\1/p' <<< "$summary")
if ! awk -v a="${accuracy:-0}" 'BEGIN { exit !(a >= 0.90) }'; then
  log "FAILED: val_accuracy ${accuracy:-none} < 0.90"
  exit 1
fi
log "all GPU checks passed (val_accuracy $accuracy)"
