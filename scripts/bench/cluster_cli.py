"""The local cluster as the benchmarks drive it: the `flotilla` CLI (FLOTILLA_BIN), job status,
workers, and polling until a condition holds. Shared by handover.py and recovery.py."""
import json
import os
import subprocess
import time

BIN = os.environ["FLOTILLA_BIN"]


def cli(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, check=True).stdout


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def status(job):
    return last_json(cli("status", job, "-o", "json"))


def workers():
    return last_json(cli("workers", "--all", "-o", "json"))


def wait(job, cond, limit_s=120, poll_s=0.005, ended=("Failed", "Cancelled")):
    """Polls `job` until `cond(status)`: (status, when). Gives up (exits) once the job is in one
    of `ended` or after `limit_s`."""
    started = time.monotonic()
    while True:
        s = status(job)
        if cond(s):
            return s, time.monotonic()
        if s["state"] in ended or time.monotonic() - started > limit_s:
            raise SystemExit(f"{job}: gave up waiting: {json.dumps(s)[:2000]}")
        time.sleep(poll_s)


def wait_idle(count, limit_s=60):
    """Until `count` workers are idle: each round starts with a spare (the previous round's
    replacement has joined), so the figures measure the notice path, not waiting for capacity."""
    started = time.monotonic()
    while True:
        listed = workers()
        if sum(1 for w in listed if w["state"] == "Idle") >= count:
            return
        if time.monotonic() - started > limit_s:
            raise SystemExit(f"fewer than {count} idle workers after {limit_s} s: {listed}")
        time.sleep(0.2)
