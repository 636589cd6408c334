#!/usr/bin/env bash
# The benches that 2 shared cores cannot settle, prepared for one call on a machine with cores
# of its own (the lent 16-core device; no cargo, no network there): issue 25's CNN live swap
# step against one step + the transfer (handover.sh), issue 19's coordinator against etcd
# (coordinator.sh) and the ring against gloo (allreduce.sh, with the machine's own torch).
#
#   scripts/bench/device.sh pack    here: a release build, stripped, and etcd + etcdctl
#                                   (Debian's etcd-server/etcd-client), gzipped into
#                                   .device-carry/ (ignored by git; ~26 MB)
#   scripts/bench/device.sh run     there, in the repository root, with .device-carry carried:
#                                   each bench in turn, most wanted first, within a time budget
#
# `run` writes each bench's JSON lines to $OUT/<bench>.jsonl as they come (partial files come
# back if the call is cut off) and its stderr to $OUT/<bench>.log; DEVICE_BUDGET_S (default
# 500) stops starting benches that would not fit (each has a time estimate below, measured on
# the 2-core machine) and stops one that runs past twice its estimate. DEVICE_QUICK=1 runs each bench at its smallest size (a check of this
# script, not figures). A bench that fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=.device-carry

pack() {
  set -e
  command -v etcd >/dev/null && command -v etcdctl >/dev/null \
    || { echo "error: etcd and etcdctl are needed (apt-get install etcd-server etcd-client)" >&2; exit 1; }
  source scripts/bench/build.sh
  mkdir -p "$carry"
  strip -o "$carry/flotilla" "$flotilla"
  gzip -f "$carry/flotilla"
  gzip -c "$(command -v etcd)" > "$carry/etcd.gz"
  gzip -c "$(command -v etcdctl)" > "$carry/etcdctl.gz"
  du -ch "$carry"/*.gz | tail -1 >&2
  echo "device run: command 'scripts/bench/device.sh run', carry [\"$carry\"], timeout_s 560" >&2
}

run() {
  local out=${OUT:-$(pwd)/device-out} budget=${DEVICE_BUDGET_S:-500} quick=${DEVICE_QUICK:-0}
  local bin=/tmp/flotilla-device-bin started=$SECONDS
  mkdir -p "$out" "$bin"
  for f in flotilla etcd etcdctl; do
    [[ -f "$carry/$f.gz" ]] || { echo "error: $carry/$f.gz is missing: run 'device.sh pack' here and carry $carry" >&2; exit 1; }
    gunzip -c "$carry/$f.gz" > "$bin/$f" && chmod +x "$bin/$f"
  done
  export PATH="$bin:$PATH" FLOTILLA_BIN="$bin/flotilla"
  {
    echo "{\"bench\":\"device\",\"cpus\":$(nproc),\"kernel\":\"$(uname -r)\",\"flotilla\":\"$("$FLOTILLA_BIN" --version)\",\"quick\":$quick}"
  } | tee "$out/device.jsonl"
  # name, estimate (s), command. Estimates: full size on 2 cores, with margin.
  local -a benches
  if [[ "$quick" == 1 ]]; then
    benches=(
      "handover_cnn|60|LIVE=1 MODEL=cnn scripts/bench/handover.sh 1 2"
      "coordinator|60|scripts/bench/coordinator.sh 100 1"
      "allreduce|60|TORCH_PYTHON=\${TORCH_PYTHON:-python3} scripts/bench/allreduce.sh 1 1"
    )
  else
    benches=(
      "handover_cnn|300|LIVE=1 MODEL=cnn scripts/bench/handover.sh 3 10"
      "coordinator|150|scripts/bench/coordinator.sh 2000 2"
      "allreduce|150|TORCH_PYTHON=\${TORCH_PYTHON:-python3} scripts/bench/allreduce.sh 64 2"
    )
  fi
  local entry name estimate command rc
  for entry in "${benches[@]}"; do
    IFS='|' read -r name estimate command <<<"$entry"
    if (( SECONDS - started + estimate > budget )); then
      echo "{\"bench\":\"device\",\"skipped\":\"$name\",\"why\":\"about ${estimate} s left to run it; the budget is ${budget} s\"}" | tee -a "$out/device.jsonl"
      continue
    fi
    echo "==> $name: $command" >&2
    local t0=$SECONDS limit=$((budget - (SECONDS - started)))
    (( limit < 2 * estimate )) || limit=$((2 * estimate))
    # A bench that hangs is stopped (rc 124) so that the ones after it still run.
    timeout --kill-after=10 "$limit" bash -c "$command" > >(tee "$out/$name.jsonl") 2> "$out/$name.log"
    rc=$?
    echo "{\"bench\":\"device\",\"ran\":\"$name\",\"rc\":$rc,\"seconds\":$((SECONDS - t0))}" | tee -a "$out/device.jsonl"
    (( rc == 0 )) || tail -5 "$out/$name.log" >&2
  done
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: scripts/bench/device.sh pack|run" >&2; exit 2 ;;
esac
