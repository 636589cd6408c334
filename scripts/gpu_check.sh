#!/usr/bin/env bash
# The GPU check: one script for a machine with NVIDIA GPUs (no network needed once the crates
# are fetched). Builds flotilla with `--features cuda`, then:
#   1. probes the GPUs (driver, NVRTC, device count) - on a machine without one it prints why
#      and exits 2 ("no GPU": nothing to check, not a failure of the code);
#   2. NCCL all-reduce over every GPU, 1-256 MiB (JSON: world, bytes, busbw_GBps);
#   3. burn-cuda MLP and CNN steps vs the CPU in the same run (JSON: samples/s, ratio);
#   4. end to end: `flotilla train` of examples/mnist-mlp.toml on 1 GPU must reach >= 0.90
#      validation accuracy;
#   5. checkpoints cross devices (GPU -> CPU and CPU -> GPU resumes finish >= 0.90);
#   6. the product path: `flotilla up --workers 1` (the agent counts its GPUs), `submit` of the
#      1-GPU job, `--follow`: it must succeed with >= 0.90 as well.
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
[[ -z "$out" ]] || mkdir -p "$out"
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
# NCCL and NVRTC (which compiles burn's CUDA kernels) are loaded at run time. They often sit
# outside the loader's path: in /usr/local/cuda, or in Python wheels (nvidia-nccl-cu13,
# nvidia-cuda-nvrtc) next to PyTorch. For each one the loader does not know, add the folder
# that holds it to LD_LIBRARY_PATH (printed, so a user can do the same for their workers).
add_lib_dirs() {
  local lib dir dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
  if command -v python3 >/dev/null 2>&1; then
    while IFS= read -r dir; do dirs+=("$dir"); done < <(python3 -c '
import glob, os, site
for s in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(os.path.join(s, "nvidia", "*", "lib"))):
        print(d)' 2>/dev/null || true)
  fi
  for lib in libnccl.so libnvrtc.so; do
    if ldconfig -p 2>/dev/null | grep -q "$lib"; then continue; fi
    for dir in "${dirs[@]}"; do
      if compgen -G "$dir/$lib*" >/dev/null; then
        export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        log "$lib from $dir (added to LD_LIBRARY_PATH)"
        break
      fi
    done
  done
}
add_lib_dirs
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
# A fresh compiled-kernel cache: this first run compiles burn's CUDA kernels.
export FLOTILLA_KERNEL_CACHE="$work/kernels"
summary=$("$bin" train "$work/mnist-gpu.toml" -o json 2> "$work/train-1.log" | tail -1)
cat "$work/train-1.log" >&2
emit "$(printf '{"bench":"gpu_train_e2e","summary":%s}' "$summary")"
accuracy=$(sed -n 's/.*"val_accuracy":\([0-9.eE+-]*\).*/\1/p' <<< "$summary")
if ! awk -v a="${accuracy:-0}" 'BEGIN { exit !(a >= 0.90) }'; then
  log "FAILED: val_accuracy ${accuracy:-none} < 0.90"
  exit 1
fi

log "first step of a fresh process: compiled-kernel cache cold, warm, and cold again"
# The rank's log says when its first step came: "first step X ms after the assignment". A
# second process with the same cache skips the compilation; a third with an empty one shows
# what the cache (not the driver's own) saves.
first_step_ms() { local ms; ms=$(sed -n 's/.*started: first step \([0-9.]*\) ms.*/\1/p' "$1" | head -1); echo "${ms:-null}"; }
"$bin" train "$work/mnist-gpu.toml" -o json > /dev/null 2> "$work/train-2.log"
FLOTILLA_KERNEL_CACHE="$work/kernels-empty" "$bin" train "$work/mnist-gpu.toml" -o json > /dev/null 2> "$work/train-3.log"
emit "$(printf '{"bench":"gpu_first_step","cold_ms":%s,"warm_cache_ms":%s,"cold_again_ms":%s,"cached_files":%s}' \
  "$(first_step_ms "$work/train-1.log")" "$(first_step_ms "$work/train-2.log")" "$(first_step_ms "$work/train-3.log")" \
  "$(find "$work/kernels" -type f | wc -l)")"

log "checkpoints cross devices: 200 steps on the GPU, the rest on the CPU, and the other way round"
# One checkpoint format for both: a GPU run's checkpoint resumes on a CPU and vice versa, and
# each finished run must still reach >= 0.90.
grep -v '^gpus = 1$' "$work/mnist-gpu.toml" > "$work/mnist-cpu.toml"
cross() { # $1: device of the first 200 steps, $2: of the rest
  local first=$work/mnist-$1.toml rest=$work/mnist-$2.toml ck=$work/ck-$1-$2 summary accuracy
  "$bin" train "$first" --steps 200 --checkpoint-dir "$ck" -o json > /dev/null 2>&1 || return 1
  summary=$("$bin" train "$rest" --resume-from "$ck/ckpt/000000000200" -o json 2> /dev/null | tail -1)
  emit "$(printf '{"bench":"gpu_cross_device_resume","first":"%s","rest":"%s","summary":%s}' "$1" "$2" "${summary:-null}")"
  accuracy=$(sed -n 's/.*"val_accuracy":\([0-9.eE+-]*\).*/\1/p' <<< "$summary")
  awk -v a="${accuracy:-0}" 'BEGIN { exit !(a >= 0.90) }'
}
cross gpu cpu || { log "FAILED: a GPU checkpoint did not finish on the CPU"; exit 1; }
cross cpu gpu || { log "FAILED: a CPU checkpoint did not finish on the GPU"; exit 1; }

log "end to end on a cluster: flotilla up --workers 1, submit the 1-GPU job, --follow"
# The product path: the agent counts its GPUs (nvidia-smi -L) and registers them, the scheduler
# places a gpus = 1 job on it, the agent trains on CUDA and the job succeeds.
(
  cd "$work"
  trap '"$bin" down --purge >/dev/null 2>&1 || true' EXIT
  "$bin" up --workers 1 >&2
  "$bin" workers >&2
  id=$("$bin" submit mnist-gpu.toml --follow | tee /dev/stderr | tail -1)
  "$bin" -o json status "$id" > status.json
)
job=$(tr -d '\n' < "$work/status.json" 2>/dev/null || true)
emit "$(printf '{"bench":"gpu_cluster_e2e","job":%s}' "${job:-null}")"
grep -q '"Succeeded"' <<< "$job" || { log "FAILED: the cluster job did not succeed: ${job:-no job listed}"; exit 1; }
cluster_accuracy=$(sed -n 's/.*"val_accuracy":\([0-9.eE+-]*\).*/\1/p' <<< "$job")
if ! awk -v a="${cluster_accuracy:-0}" 'BEGIN { exit !(a >= 0.90) }'; then
  log "FAILED: the cluster job's val_accuracy ${cluster_accuracy:-none} < 0.90"
  exit 1
fi
log "all GPU checks passed (val_accuracy $accuracy alone, $cluster_accuracy on the cluster)"
