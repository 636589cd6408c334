#!/usr/bin/env bash
# What TLS costs the coordinator: committed submissions/s and p50/p99 latency at 1 and 16
# concurrent clients on a 3-node loopback cluster, once with TLS (the default of `up`: every
# client, peer and worker connection) and once with `up --no-tls`, in the same run, alternating
# twice. One JSON line per case, then one line of TLS/plaintext ratios per client count.
#
#   scripts/bench/tls.sh [OPS]        (default OPS=1000)
#
# FLOTILLA_BENCH_PROFILE=dev uses the debug build that scripts/test.sh leaves (dependencies,
# rustls and aws-lc included, are optimised there too) instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
ops="${1:-1000}"
source scripts/bench/build.sh
bin="$flotilla"
work=$(mktemp -d)
trap 'for h in "$work"/*/.flotilla; do FLOTILLA_HOME="$h" "$bin" down --purge >/dev/null 2>&1 || true; done; rm -rf "$work"' EXIT
results="$work/results.jsonl"
for round in 1 2; do
  for mode in plaintext tls; do
    export FLOTILLA_HOME="$work/$mode-$round/.flotilla"
    flag=(); [ "$mode" = plaintext ] && flag=(--no-tls)
    "$bin" up --coordinators 3 "${flag[@]}" >/dev/null
    "$bin" bench-submit --clients 1 --ops "$((ops / 4))" >/dev/null   # warm-up
    for clients in 1 16; do
      line=$("$bin" bench-submit --clients "$clients" --ops "$ops")
      python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["tls"]=sys.argv[2]=="tls"; d["round"]=int(sys.argv[3]); print(json.dumps(d))' \
        "$line" "$mode" "$round" | tee -a "$results"
    done
    "$bin" down --purge >/dev/null
  done
done
python3 - "$results" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
for clients in sorted({r["clients"] for r in rows}):
    pick = lambda tls, key: statistics.median(r[key] for r in rows if r["clients"] == clients and r["tls"] == tls)
    print(json.dumps({
        "bench": "coordinator_tls_vs_plaintext",
        "clients": clients,
        "ops_per_s_ratio": round(pick(True, "ops_per_s") / pick(False, "ops_per_s"), 3),
        "p50_ratio": round(pick(True, "p50_ms") / pick(False, "p50_ms"), 3),
        "p99_ratio": round(pick(True, "p99_ms") / pick(False, "p99_ms"), 3),
        "tls_ops_per_s": round(pick(True, "ops_per_s"), 1),
        "plaintext_ops_per_s": round(pick(False, "ops_per_s"), 1),
    }))
PY
