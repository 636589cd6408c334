#!/usr/bin/env bash
# What one CLI command costs: wall time and CPU of `flotilla status`, `status -o json` and
# `workers` against a local cluster (1 coordinator, 1 worker, TLS as `up` makes it), each a
# fresh process as a user or a script runs it, against the floor of a process start that
# touches neither the network nor TLS (`flotilla --version`), in the same run. One JSON line
# per (build, command): p50/p90 wall ms, mean CPU ms (user + system, from the children's
# rusage), and `p50_vs_floor`. With a second build, runs alternate between the two and a
# `cli_compare` line per command gives this build / the other.
#
#   scripts/bench/cli.sh [RUNS]          (default 30 per command and build)
#
# FLOTILLA_BIN=path measures a binary built elsewhere (no build); FLOTILLA_BASE_BIN=path adds
# another build (e.g. the commit before a change) to the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-30}"
source scripts/bench/build.sh # FLOTILLA_BIN or a release build
bin="$flotilla"
work=$(mktemp -d)
export FLOTILLA_HOME="$work/.flotilla"
trap '"$bin" down --purge >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$bin" up --workers 1 >/dev/null
python3 - "$runs" "$bin" "${FLOTILLA_BASE_BIN:-}" <<'PY'
import json, math, resource, statistics, subprocess, sys, time

runs, builds = int(sys.argv[1]), {"this": sys.argv[2]}
if sys.argv[3]:
    builds["base"] = sys.argv[3]
commands = {"floor": ["--version"], "status": ["status"], "status_json": ["status", "-o", "json"],
            "workers": ["workers"]}

def once(binary, args):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([binary, *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall * 1e3, cpu * 1e3

samples = {(b, c): [] for b in builds for c in commands}
for command, args in commands.items():
    for build in builds.values():
        once(build, args)  # warm the page cache
    for _ in range(runs):
        for name, build in builds.items():  # alternating: both builds see the same machine
            samples[(name, command)].append(once(build, args))

summary = {}
for (name, command), values in samples.items():
    walls = sorted(w for w, _ in values)
    summary[(name, command)] = {
        "p50_ms": statistics.median(walls),
        "p90_ms": walls[math.ceil(len(walls) * 0.9) - 1],
        "cpu_ms": statistics.mean(c for _, c in values),
    }
for (name, command), s in summary.items():
    floor = summary[(name, "floor")]["p50_ms"]
    print(json.dumps({"bench": "cli", "build": name, "command": command, "runs": runs,
                      **{k: round(v, 2) for k, v in s.items()},
                      "p50_vs_floor": round(s["p50_ms"] / floor, 2) if floor else None}))
if "base" in builds:
    for command in commands:
        this, base = summary[("this", command)], summary[("base", command)]
        print(json.dumps({"bench": "cli_compare", "command": command,
                          "p50_vs_base": round(this["p50_ms"] / base["p50_ms"], 2),
                          "cpu_vs_base": round(this["cpu_ms"] / base["cpu_ms"], 2) if base["cpu_ms"] else None}))
PY
