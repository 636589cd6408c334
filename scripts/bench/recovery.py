#!/usr/bin/env python3
"""Recovery benchmark (driven by recovery.sh): one JSON line per measurement.

On a local cluster (1 coordinator, 3 workers: a gang of 2 and a spare; the coordinator
replaces lost and interrupted workers), trains MNIST MLP jobs and measures:

- recovery_sigkill: SIGKILL of a gang member -> the gang's break is recorded (detection),
  -> a new generation runs (regroup), -> its first step beyond the resume point (resume).
- recovery_sigstop: SIGSTOP of a gang member (frozen, sockets open: a silent loss, found by its
  5 s lease), same timeline (`recovery.py N sigstop` runs only these rounds).
- recovery_notice: `flotilla preempt` (spot notice) -> the generation stops at a checkpoint ->
  the next generation's first step. Includes the agent's metadata poll (100 ms;
  FLOTILLA_IMDS_POLL_MS sets it, and each line carries it as `imds_poll_ms`).
- checkpoint_stall: an uninterrupted job's checkpoint stall per save (ms and % of a step) and
  share of the training time, from rank 0's log.
- checkpoint_throughput: checkpoint write rate (bytes / background time, which includes the
  Raft record) against this disk's sequential write rate measured in the same run with dd.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

from cluster_cli import cli, wait, wait_idle, workers

WORK = os.environ["WORK"]
DATA = os.path.abspath("examples/data/mnist_5k.csv.gz")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def submit(name, epochs, every_steps=20):
    spec = os.path.join(WORK, f"{name}.toml")
    with open(spec, "w") as f:
        f.write(
            f'name = "{name}"\nmodel = {{ kind = "mlp", hidden = [256, 128] }}\n'
            f'data = {{ train = "{DATA}" }}\ntrain = {{ epochs = {epochs}, batch_size = 64 }}\n'
            f"workers = {{ min = 2, max = 2 }}\ncheckpoint = {{ every_steps = {every_steps} }}\n"
        )
    return cli("submit", spec).strip().splitlines()[-1]


def gang(job):
    return sorted(w["id"] for w in workers() if w["job_id"] == job and w["state"] == "Busy")


def emit(record):
    print(json.dumps(record), flush=True)


def freeze(worker):
    """SIGSTOP of a local worker's agent (its process frozen, its sockets open: a silent loss)."""
    instance = next(w["instance_id"] for w in workers() if w["id"] == worker)
    with open(os.path.join(os.environ["FLOTILLA_HOME"], "instances", f"{instance}.json")) as f:
        pid = json.load(f)["pid"]
    os.kill(pid, signal.SIGSTOP)
    return pid


def recovery(kind, round_no):
    wait_idle(3)
    job = submit(f"{kind}-{round_no}", epochs=40)
    running, _ = wait(job, lambda s: s["state"] == "Running" and s["step"] > 100)
    generation = running["generation"]
    victim = gang(job)[round_no % 2]
    t0 = time.monotonic()
    frozen = None
    if kind == "sigstop":
        frozen = freeze(victim)
    else:
        cli("preempt", victim, *(["--hard"] if kind == "sigkill" else []))
    ended, t_end = wait(job, lambda s: s["generation"] > generation or s["state"] != "Running")
    if frozen is not None:
        os.kill(frozen, signal.SIGKILL)
    resume_step = (ended["latest_checkpoint"] or {}).get("step", 0)
    regrouped, t_regroup = wait(job, lambda s: s["generation"] > generation and s["state"] == "Running")
    resume_step = (regrouped["latest_checkpoint"] or {}).get("step", resume_step)
    first, t_first = wait(job, lambda s: s["generation"] > generation and s["step"] > resume_step)
    cli("cancel", job)
    breaks = [e["message"] for e in first["events"] if e["kind"] in ("peer_lost", "worker_lost")]
    emit({
        "bench": f"recovery_{kind}",
        "round": round_no,
        "imds_poll_ms": int(os.environ.get("FLOTILLA_IMDS_POLL_MS", "100")),
        "to_detection_ms": round((t_end - t0) * 1e3, 1),
        "to_new_generation_ms": round((t_regroup - t0) * 1e3, 1),
        "to_first_step_ms": round((t_first - t0) * 1e3, 1),
        "steps_lost": first["steps_lost"],
        "resumed_from_step": resume_step,
        "generations": first["generation"] - generation,
        "breaks": breaks,
    })


def dd_rate_mb_s(sync):
    path = os.path.join(WORK, "dd.bin")
    args = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=256"] + (["conv=fdatasync"] if sync else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stderr
    os.remove(path)
    seconds = float(re.search(r"([\d.]+) s,", out).group(1))
    return 256 * 1048576 / seconds / 1e6


def stall_and_throughput():
    job = submit("stall", epochs=20)
    done, _ = wait(job, lambda s: s["state"] == "Succeeded", limit_s=300, poll_s=0.2)
    log = cli("logs", job)
    final = re.search(
        r"this generation: (\d+) steps in ([\d.]+) s, (\d+) checkpoint\(s\), checkpoint stall ([\d.]+) ms", log
    )
    steps, seconds, saves, stall_ms = int(final[1]), float(final[2]), int(final[3]), float(final[4])
    step_ms = seconds * 1e3 / steps
    emit({
        "bench": "checkpoint_stall",
        "steps": steps,
        "saves": saves,
        "step_ms": round(step_ms, 3),
        "stall_per_save_ms": round(stall_ms / max(saves, 1), 3),
        "stall_per_save_pct_of_step": round(100 * stall_ms / max(saves, 1) / step_ms, 2),
        "stall_pct_of_training": round(100 * stall_ms / (seconds * 1e3), 3),
    })
    writes = [(int(b), float(ms)) for b, ms in re.findall(r"\((\d+) bytes in ([\d.]+) ms in the background", log)]
    total_bytes = sum(b for b, _ in writes)
    total_ms = sum(ms for _, ms in writes)
    rate = total_bytes / (total_ms / 1e3) / 1e6
    disk_sync, disk_cached = dd_rate_mb_s(True), dd_rate_mb_s(False)
    emit({
        "bench": "checkpoint_throughput",
        "checkpoints": len(writes),
        "checkpoint_bytes": writes[0][0] if writes else 0,
        "checkpoint_mb_s": round(rate, 1),
        "disk_seq_write_fdatasync_mb_s": round(disk_sync, 1),
        "disk_seq_write_page_cache_mb_s": round(disk_cached, 1),
        "ratio_vs_fdatasync": round(rate / disk_sync, 3),
        "ratio_vs_page_cache": round(rate / disk_cached, 3),
    })


def main():
    if len(sys.argv) > 2 and sys.argv[2] == "sigstop":
        for round_no in range(ROUNDS):
            recovery("sigstop", round_no)
        return
    only_notices = len(sys.argv) > 2 and sys.argv[2] == "notice"
    if not only_notices:
        stall_and_throughput()
    for round_no in range(ROUNDS):
        if not only_notices:
            recovery("sigkill", round_no)
        recovery("notice", round_no)


main()
