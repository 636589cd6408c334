"""PyTorch DDP (gloo) on the same training step as `flotilla bench-train`: an MLP 784-512-512-10,
Adam, batch 64 per rank, synthetic data, 2 ranks as processes on loopback, one thread each.

DDP overlaps its bucketed all-reduce with the backward pass, so its communication share is
measured as the exposed part: comm_fraction = 1 - (median step without gradient sync, under
`no_sync()`) / (median step with it). `flotilla bench-train`'s comm_fraction (time inside the
all-reduce / step) is the same quantity for an exchange that does not overlap. One JSON line.

    python ddp_train.py [STEPS]      (needs torch)
"""
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

BATCH = 64
WARMUP = 10


def timed_steps(model, optimizer, x, y, steps, sync):
    times = []
    loss_fn = nn.CrossEntropyLoss()
    for i in range(steps + WARMUP):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if sync:
            loss_fn(model(x), y).backward()
        else:
            with model.no_sync():
                loss_fn(model(x), y).backward()
        optimizer.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def rank_main(rank, world, port, steps, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.manual_seed(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, 784, generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    with_sync = timed_steps(model, optimizer, x, y, steps, True)
    dist.barrier()
    without = timed_steps(model, optimizer, x, y, steps, False)
    results[rank] = (with_sync, without)
    dist.destroy_process_group()


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(world, port, steps, results), nprocs=world, join=True)
        with_sync = max(results[r][0] for r in range(world))
        without = max(results[r][1] for r in range(world))
    print(json.dumps({
        "bench": "train_mlp_784_512_512_10", "impl": "torch_ddp_gloo", "torch": torch.__version__,
        "world": world, "batch_per_worker": BATCH, "steps": steps,
        "median_step_ms": with_sync * 1000, "median_step_no_sync_ms": without * 1000,
        "comm_fraction": max(0.0, 1 - without / with_sync),
        "samples_s": world * BATCH / with_sync,
    }), flush=True)


if __name__ == "__main__":
    main()
