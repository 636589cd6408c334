#!/usr/bin/env bash
# Submit-to-first-step latency on the local cluster (1 coordinator, 2 worker agents): time from
# `submit` to the gang forming (Running) and to the first training step reported. One JSON line
# per job. The submit acknowledgement time of the same job is the same-run baseline.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/flotilla"
work=$(mktemp -d)
export FLOTILLA_HOME="$work/.flotilla"
trap '"$bin" down --purge >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$bin" up --workers 2 >/dev/null
"$bin" bench-first-step --rounds "${1:-5}"
