"""PyTorch DDP training with Flotilla's checkpoint/resume contract; runs unchanged under torchrun.

    flotilla submit examples/pytorch-ddp.toml --follow      # on a Flotilla cluster
    torchrun --standalone --nproc-per-node 2 train.py       # anywhere, without Flotilla

What it relies on (README, "Bring your own training code"):
- RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: set by torchrun and by Flotilla.
- FLOTILLA_CHECKPOINT_DIR: rank 0 writes <dir>/<step>/ckpt.pt, then prints
  "FLOTILLA_CHECKPOINT <step>"; Flotilla uploads it and records it (default ./checkpoints).
- FLOTILLA_RESUME_FROM: the newest recorded checkpoint, downloaded (unset on a fresh start).
- SIGTERM: a preemption notice. Every rank finishes its step, the ranks agree to stop (an
  all-reduce of the flag), rank 0 checkpoints, all exit 0; the job resumes on new capacity.
- JSON lines with "step" and "loss" show up in `flotilla status`.

The data is a seeded synthetic classification task so the example needs no download; swap
`make_data` for your own Dataset.
"""
import json
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = int(os.environ.get("STEPS", "600"))
BATCH = int(os.environ.get("BATCH", "64"))
EVERY = int(os.environ.get("CHECKPOINT_EVERY", "100"))
FEATURES, CLASSES = 32, 4

stop_requested = False


def on_notice(signum, frame):
    global stop_requested
    stop_requested = True


def make_data(n, seed):
    """Gaussian blobs around CLASSES fixed centres in FEATURES dimensions; `seed` draws the
    samples (the same on every rank), so train and validation share the task."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 0.3
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[labels] + torch.randn(n, FEATURES, generator=g), labels


def main():
    signal.signal(signal.SIGTERM, on_notice)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo")  # reads MASTER_ADDR/MASTER_PORT

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, CLASSES)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = 0
    resume = os.environ.get("FLOTILLA_RESUME_FROM")
    if resume:
        state = torch.load(os.path.join(resume, "ckpt.pt"), map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if rank == 0:
            print(f"resumed at step {step}", flush=True)
    ddp = DDP(model, device_ids=[local_rank] if gpu else None)

    x, y = make_data(20_000, seed=1)
    val_x, val_y = make_data(2_000, seed=2)
    checkpoints = os.environ.get("FLOTILLA_CHECKPOINT_DIR", "checkpoints")

    def save(at):
        if rank != 0:
            return
        folder = os.path.join(checkpoints, str(at))
        os.makedirs(folder, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": at},
                   os.path.join(folder, "ckpt.pt"))
        print(f"FLOTILLA_CHECKPOINT {at}", flush=True)

    started, first = time.time(), step
    while step < STEPS:
        # The sample order is a function of the step: a resumed run sees the same batches.
        g = torch.Generator().manual_seed(step)
        index = torch.randint(0, len(x), (BATCH * world,), generator=g)[rank * BATCH:(rank + 1) * BATCH]
        loss = F.cross_entropy(ddp(x[index].to(device)), y[index].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % EVERY == 0 or step == STEPS:
            save(step)
        # Every rank stops after the same step once any rank got the notice.
        flag = torch.tensor([1.0 if stop_requested else 0.0], device=device)
        dist.all_reduce(flag)
        if rank == 0 and step % 10 == 0:
            rate = (step - first) * BATCH * world / max(time.time() - started, 1e-9)
            print(json.dumps({"step": step, "loss": loss.item(), "samples_per_s": rate, "total_steps": STEPS}),
                  flush=True)
        if flag.item() > 0:
            if step % EVERY != 0 and step != STEPS:
                save(step)
            break

    if rank == 0 and step == STEPS:
        with torch.no_grad():
            accuracy = (model(val_x.to(device)).argmax(1).cpu() == val_y).float().mean().item()
        print(json.dumps({"step": step, "loss": loss.item(), "val_accuracy": accuracy}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
