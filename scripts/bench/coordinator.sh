#!/usr/bin/env bash
# Coordinator benchmark against etcd on the same machine, in the same run.
#
# A 3-node loopback Flotilla cluster (TLS on every client and peer connection, fsync on every
# Ready) and a 3-node etcd cluster (etcd's defaults: fsync on every Ready; TLS with the same
# certificates, mutual on the peer links as Flotilla's) take the same load from the same client
# code (`flotilla bench-submit`, tonic): N concurrent clients, each with its own connection to
# the leader, each waiting for its write to be acknowledged before the next. A Flotilla write is
# a job submission (spec ~100 bytes, deduplicated by request id); an etcd write is a Put of the
# same encoded spec under the request id. Passes alternate Flotilla and etcd; the summary lines
# compare medians. Then the leader failover time (SIGKILL of the leader -> next acknowledged
# write, Flotilla only), and the machine's limit: fdatasync of a 4 KiB overwrite. Each case
# also gives the CPU its three servers spent per write (`server_cpu_us_per_op`, from /proc),
# and the summary its ratio to etcd's (`cpu_per_op_vs_etcd`).
#
#   scripts/bench/coordinator.sh [OPS] [PASSES]        (defaults 2000, 3)
#
# FLOTILLA_BIN=path runs a binary built elsewhere (no build).
#
# etcd comes from Debian's etcd-server package (`apt-get install etcd-server etcd-client`, 3.4);
# without it the etcd lines are skipped with a note. One JSON line per case on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
ops="${1:-2000}"
passes="${2:-3}"
source scripts/bench/build.sh # FLOTILLA_BIN or a release build
bin="$flotilla"
work=$(mktemp -d)
export FLOTILLA_HOME="$work/.flotilla"
etcd_pids=()
cleanup() {
  "$bin" down --purge >/dev/null 2>&1 || true
  for pid in "${etcd_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" up --coordinators 3 >/dev/null
tls="$FLOTILLA_HOME/tls"

etcd_leader=""
if command -v etcd >/dev/null && command -v etcdctl >/dev/null; then
  # Loopback ports chosen by the OS for the 6 listeners (bound and released just before).
  mapfile -t ports < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
for s in socks: print(s.getsockname()[1])')
  initial=""
  for i in 1 2 3; do initial+="${initial:+,}e$i=https://127.0.0.1:${ports[$((i + 2))]}"; done
  for i in 1 2 3; do
    client="https://127.0.0.1:${ports[$((i - 1))]}"
    peer="https://127.0.0.1:${ports[$((i + 2))]}"
    etcd --name "e$i" --data-dir "$work/etcd-$i" --logger zap --log-level error \
      --listen-client-urls "$client" --advertise-client-urls "$client" \
      --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
      --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token bench \
      --cert-file "$tls/coordinator.pem" --key-file "$tls/coordinator-key.pem" \
      --peer-cert-file "$tls/coordinator.pem" --peer-key-file "$tls/coordinator-key.pem" \
      --peer-trusted-ca-file "$tls/ca.pem" --peer-client-cert-auth >"$work/etcd-$i.log" 2>&1 &
    etcd_pids+=("$!")
  done
  endpoints="https://127.0.0.1:${ports[0]},https://127.0.0.1:${ports[1]},https://127.0.0.1:${ports[2]}"
  for _ in $(seq 50); do
    status=$(ETCDCTL_API=3 etcdctl --cacert "$tls/ca.pem" --endpoints "$endpoints" --command-timeout 2s \
      endpoint status -w json 2>/dev/null || true)
    etcd_leader=$(python3 -c '
import json, sys
try: rows = json.loads(sys.argv[1] or "[]")
except ValueError: rows = []
print(next((r["Endpoint"] for r in rows if r["Status"]["leader"] == r["Status"]["header"]["member_id"]), ""))' "$status")
    [[ -n "$etcd_leader" ]] && break
    sleep 0.2
  done
  [[ -n "$etcd_leader" ]] || { echo "etcd elected no leader; its logs:" >&2; tail -5 "$work"/etcd-*.log >&2; exit 1; }
else
  echo '{"bench":"etcd_put","skipped":"etcd is not installed (apt-get install etcd-server etcd-client)"}'
fi
etcd_args=(--etcd "$etcd_leader" --etcd-ca "$tls/ca.pem")

out="$work/lines.jsonl"
# CPU the three servers spent (user + system, clock ticks), read from /proc: per write it is a
# steadier figure than writes/s on a machine whose speed drifts (both clusters share the cores
# with the client, so only the servers are counted).
flotilla_pids=$(pgrep -f -- "--data-dir $FLOTILLA_HOME/coordinator-" | tr '\n' ' ')
ticks() { for pid in "$@"; do cat "/proc/$pid/stat" 2>/dev/null; done | awk '{ s += $14 + $15 } END { print s + 0 }'; }
hz=$(getconf CLK_TCK)
# Runs bench-submit with the given arguments against the servers PIDS...; adds their CPU per
# write to its JSON line.
measured() {
  local pids=$1 clients=$2; shift 2
  local before after
  before=$(ticks $pids)
  "$bin" bench-submit "$@" --clients "$clients" --ops "$ops" > "$work/line.json"
  after=$(ticks $pids)
  python3 -c 'import json, sys
line = json.load(open(sys.argv[1]))
line["server_cpu_us_per_op"] = round((int(sys.argv[2]) - int(sys.argv[3])) * 1e6 / int(sys.argv[4]) / line["ops"], 1)
print(json.dumps(line))' "$work/line.json" "$after" "$before" "$hz"
}
"$bin" bench-submit --clients 1 --ops "$((ops / 4))" >/dev/null   # warm-up
[[ -z "$etcd_leader" ]] || "$bin" bench-submit "${etcd_args[@]}" --clients 1 --ops "$((ops / 4))" >/dev/null
for pass in $(seq "$passes"); do
  for clients in 1 16; do
    measured "$flotilla_pids" "$clients" | sed "s/^{/{\"pass\":$pass,/" | tee -a "$out"
    if [[ -n "$etcd_leader" ]]; then
      measured "${etcd_pids[*]}" "$clients" "${etcd_args[@]}" | sed "s/^{/{\"pass\":$pass,/" | tee -a "$out"
    fi
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for clients in sorted({r["clients"] for r in rows}):
    med = {}
    for bench in ("coordinator_submit", "etcd_put"):
        mine = [r for r in rows if r["bench"] == bench and r["clients"] == clients]
        if mine:
            med[bench] = {k: statistics.median(r[k] for r in mine)
                          for k in ("ops_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_op")}
    passes = sum(1 for r in rows if r["bench"] == "coordinator_submit" and r["clients"] == clients)
    line = {"bench": "coordinator_vs_etcd", "clients": clients, "passes": passes}
    f = med["coordinator_submit"]
    line.update(flotilla_ops_per_s=round(f["ops_per_s"]), flotilla_p50_ms=round(f["p50_ms"], 3),
                flotilla_p99_ms=round(f["p99_ms"], 3), flotilla_cpu_us_per_op=round(f["server_cpu_us_per_op"], 1))
    if "etcd_put" in med:
        e = med["etcd_put"]
        line.update(etcd_ops_per_s=round(e["ops_per_s"]), etcd_p50_ms=round(e["p50_ms"], 3),
                    etcd_p99_ms=round(e["p99_ms"], 3),
                    ops_per_s_vs_etcd=round(f["ops_per_s"] / e["ops_per_s"], 2),
                    p99_vs_etcd=round(f["p99_ms"] / e["p99_ms"], 2),
                    etcd_cpu_us_per_op=round(e["server_cpu_us_per_op"], 1),
                    cpu_per_op_vs_etcd=round(f["server_cpu_us_per_op"] / e["server_cpu_us_per_op"], 2))
    print(json.dumps(line))
PY

for round in 1 2 3; do
  "$bin" bench-submit --kill-leader
  "$bin" down >/dev/null
  "$bin" up --coordinators 3 >/dev/null
done

# The disk's floor under every replicated write: one fdatasync of a 4 KiB overwrite.
python3 - "$work" <<'PY'
import json, os, statistics, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
block = os.urandom(4096)
os.pwrite(fd, block, 0); os.fdatasync(fd)
times = []
for _ in range(500):
    t = time.perf_counter(); os.pwrite(fd, block, 0); os.fdatasync(fd); times.append(time.perf_counter() - t)
os.close(fd)
times.sort()
print(json.dumps({"bench": "fdatasync_4KiB", "p50_ms": round(times[250] * 1e3, 3), "p99_ms": round(times[495] * 1e3, 3)}))
PY
