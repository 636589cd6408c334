#!/usr/bin/env bash
# How long a rank takes to load its data set: the "data N ms" of a generation's start (fetch,
# gunzip, parse, validation split), which a spare or a replacement pays before its first step.
# `flotilla train SPEC --steps 1`, RUNS times, on MNIST 5k (a gzipped CSV) and, beside it, a
# generated data set of the same shape (`synthetic:blobs`, 5,000 x 784: no file, no parsing,
# but 3.9 M Gaussian draws, so not a floor). One JSON line per (build, data set): median and
# min ms. The baseline to quote against is another build in the same run: with
# FLOTILLA_BASE_BIN, runs alternate between the two and a `data_load_compare` line per data set
# gives this build / the other.
#
#   scripts/bench/data.sh [RUNS]        (default 9; examples/mnist-mlp.toml's MNIST 5k CSV)
#
# FLOTILLA_BIN=path measures a binary built elsewhere (no build); FLOTILLA_BASE_BIN=path adds
# another build (e.g. the commit before a change) to the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-9}"
source scripts/bench/build.sh # FLOTILLA_BIN or a release build
bin="$flotilla"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp examples/mnist-mlp.toml "$work/csv.toml"
sed -i "s|^train = .*|train = \"$(pwd)/examples/data/mnist_5k.csv.gz\"|" "$work/csv.toml"
# The same shape without a file: 5,000 rows of 784 features, 10 classes.
sed "s|^train = .*|train = \"synthetic:blobs?samples=5000\&features=784\&classes=10\"|" "$work/csv.toml" \
  > "$work/synthetic.toml"
python3 - "$runs" "$work" "$bin" "${FLOTILLA_BASE_BIN:-}" <<'PY'
import json, re, statistics, subprocess, sys

runs, work = int(sys.argv[1]), sys.argv[2]
builds = {"this": sys.argv[3]}
if sys.argv[4]:
    builds["base"] = sys.argv[4]
sets = {"mnist_5k_csv_gz": f"{work}/csv.toml", "synthetic_blobs": f"{work}/synthetic.toml"}

def load_ms(binary, spec):
    out = subprocess.run([binary, "train", spec, "--steps", "1"], capture_output=True, text=True, check=True)
    found = re.search(r"\(data ([0-9.]+) ms", out.stdout + out.stderr)
    if not found:
        sys.exit(f"no 'data N ms' in the output of {binary} train {spec}:\n{out.stdout}{out.stderr}")
    return float(found.group(1))

samples = {(b, s): [] for b in builds for s in sets}
for name, spec in sets.items():
    for build in builds.values():
        load_ms(build, spec)  # warm the page cache
    for _ in range(runs):
        for build_name, build in builds.items():
            samples[(build_name, name)].append(load_ms(build, spec))
for (build_name, name), values in samples.items():
    print(json.dumps({"bench": "data_load", "build": build_name, "data": name, "runs": runs,
                      "median_ms": round(statistics.median(values), 1), "min_ms": round(min(values), 1)}))
if "base" in builds:
    for name in sets:
        this = statistics.median(samples[("this", name)])
        base = statistics.median(samples[("base", name)])
        print(json.dumps({"bench": "data_load_compare", "data": name, "median_vs_base": round(this / base, 2)}))
PY
