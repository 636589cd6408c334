"""A stdlib-only stand-in for a DDP training script, for Flotilla's command-job tests.

It follows the contract a real script follows: reads the torchrun variables, meets the other
ranks at MASTER_ADDR:MASTER_PORT, resumes from FLOTILLA_RESUME_FROM, writes checkpoints into
FLOTILLA_CHECKPOINT_DIR/<step>/ (rank 0) and announces them, prints JSON progress, and on the
notice signal checkpoints and exits 0. What it saw goes to $OUT for the test to check.

Settings (environment): OUT (required), STEPS (30), STEP_S (0.1), CKPT_EVERY (5),
FAIL_AT (a step at which rank 0 exits with status 3).
"""
import json
import os
import signal
import socket
import sys
import time

CONTRACT = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "FLOTILLA_JOB_ID", "FLOTILLA_GENERATION", "FLOTILLA_CHECKPOINT_DIR",
            "FLOTILLA_RESUME_FROM", "FLOTILLA_PREEMPT_FILE"]

out = os.environ["OUT"]
rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
generation = os.environ["FLOTILLA_GENERATION"]
steps = int(os.environ.get("STEPS", "30"))
step_s = float(os.environ.get("STEP_S", "0.1"))
every = int(os.environ.get("CKPT_EVERY", "5"))
fail_at = int(os.environ.get("FAIL_AT", "0"))

print(f"rank {rank} of {world} starts (generation {generation})", flush=True)
seen = {name: os.environ.get(name) for name in CONTRACT}
seen["cwd_payload"] = open("payload.txt").read().strip() if os.path.exists("payload.txt") else None
with open(os.path.join(out, f"env-g{generation}-r{rank}.json"), "w") as f:
    json.dump(seen, f)

# Rendezvous at MASTER_ADDR:MASTER_PORT, as torch.distributed's TCP store does.
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
if rank == 0:
    server = socket.create_server((addr, port))
    server.settimeout(60)
    peers = []
    for _ in range(world - 1):
        conn, _ = server.accept()
        peers.append(int(conn.recv(16).decode()))
        conn.close()
    with open(os.path.join(out, f"rendezvous-g{generation}.json"), "w") as f:
        json.dump(sorted(peers), f)
else:
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5) as conn:
                conn.sendall(str(rank).encode())
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)

stop = False


def on_notice(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_notice)

start = 0
resume = os.environ.get("FLOTILLA_RESUME_FROM")
if resume:
    with open(os.path.join(resume, "state.json")) as f:
        start = json.load(f)["step"]


def checkpoint(step):
    folder = os.path.join(os.environ["FLOTILLA_CHECKPOINT_DIR"], str(step))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"step": step, "weights": [step * 0.5] * 100}, f)
    print(f"FLOTILLA_CHECKPOINT {step}", flush=True)


step = start
saved = start
while step < steps:
    time.sleep(step_s)
    step += 1
    with open(os.path.join(out, f"steps-r{rank}.txt"), "a") as f:
        f.write(f"g{generation} {step}\n")
    if rank == 0:
        print(json.dumps({"step": step, "loss": 1.0 / step, "samples_per_s": 100.0, "total_steps": steps}), flush=True)
        if fail_at and step == fail_at:
            print("simulated failure", file=sys.stderr, flush=True)
            sys.exit(3)
        if step % 10 == 0 and step < steps:  # a validation while it trains
            print(json.dumps({"step": step, "val_accuracy": step / 100.0, "val_loss": 1.0 - step / 100.0}), flush=True)
        if step % every == 0:
            checkpoint(step)
            saved = step
    if stop:
        break

if stop:  # what the agent said the deadline is
    with open(os.environ["FLOTILLA_PREEMPT_FILE"]) as f:
        deadline = f.read().strip()
    with open(os.path.join(out, f"preempt-g{generation}-r{rank}.txt"), "w") as f:
        f.write(deadline)
if rank == 0 and saved != step:
    checkpoint(step)
if rank == 0 and not stop:
    print(json.dumps({"step": step, "loss": 1.0 / step, "val_accuracy": 0.75}), flush=True)
