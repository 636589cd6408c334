#!/usr/bin/env bash
# Checkpoint throughput: the trainer's checkpoint writer and reader against local disk and
# against S3 (moto's server on loopback, started here), same state, same run. One JSON line per
# store, then one with the S3/local ratios.
#
#   scripts/bench/checkpoint.sh [PARAMS] [REPEATS]     (default 2000000 params = 24 MB, 5)
#
# FLOTILLA_BENCH_PROFILE=dev uses the debug build that scripts/test.sh leaves (dependencies are
# optimised there too; checkpoint I/O is system calls and HTTP) instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/moto.sh
source scripts/bench/build.sh
params="${1:-2000000}" repeats="${2:-5}"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
export AWS_ENDPOINT_URL="$FLOTILLA_MOTO_ENDPOINT" AWS_ENDPOINT="$FLOTILLA_MOTO_ENDPOINT"
export AWS_EC2_METADATA_DISABLED=true AWS_METADATA_ENDPOINT=http://127.0.0.1:1
python3 -c 'import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], method="PUT"))' \
  "$FLOTILLA_MOTO_ENDPOINT/flotilla-bench"
dir=$(mktemp -d)
trap 'rm -rf "$dir"; kill "$moto_pid" 2>/dev/null || true' EXIT
local_line=$("$flotilla" bench-checkpoint --store "$dir" --params "$params" --repeats "$repeats")
s3_line=$("$flotilla" bench-checkpoint --store s3://flotilla-bench/ckpt --params "$params" --repeats "$repeats")
echo "$local_line"
echo "$s3_line"
python3 - "$local_line" "$s3_line" <<'PY'
import json, sys
local, s3 = (json.loads(a) for a in sys.argv[1:])
print(json.dumps({"bench": "checkpoint_ratio", "baseline": "file (fsync'd local disk)",
                  "s3_write_vs_local": round(s3["write_MBps"] / local["write_MBps"], 3),
                  "s3_read_vs_local": round(s3["read_MBps"] / local["read_MBps"], 3)}))
PY
