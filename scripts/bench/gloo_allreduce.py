"""gloo's all-reduce (PyTorch's CPU backend), measured exactly as `flotilla bench-allreduce`
measures the ring: W processes on loopback, float32 sums, sizes from 4 KiB up by factors of 4,
a warm-up call, then per round a barrier and one timed all_reduce; a round takes as long as its
slowest rank; the median round is reported. One JSON line per (world, size), same fields.

    python gloo_allreduce.py --worlds 2,4 --max-mib 256      (needs torch)
"""
import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def iterations(size_bytes):
    if size_bytes <= 1 << 20:
        return 50
    if size_bytes <= 16 << 20:
        return 20
    return 9


def rank_main(rank, world, port, sizes, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    times = {}
    for size_bytes in sizes:
        buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
        dist.all_reduce(buffer)  # warm-up
        rounds = []
        for _ in range(iterations(size_bytes)):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(buffer)
            rounds.append(time.perf_counter() - started)
        times[size_bytes] = rounds
    results[rank] = times
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--max-mib", type=int, default=256)
    args = parser.parse_args()
    sizes = []
    size_bytes = 4096
    while size_bytes <= args.max_mib << 20:
        sizes.append(size_bytes)
        size_bytes *= 4
    for world in [int(w) for w in args.worlds.split(",")]:
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(rank_main, args=(world, free_port(), sizes, results), nprocs=world, join=True)
            for size_bytes in sizes:
                per_rank = [results[r][size_bytes] for r in range(world)]
                slowest = [max(t[i] for t in per_rank) for i in range(len(per_rank[0]))]
                median = sorted(slowest)[len(slowest) // 2]  # as the ring's bench does
                algbw = size_bytes / median / 1e9
                print(json.dumps({
                    "bench": "allreduce", "impl": "gloo", "torch": torch.__version__, "world": world,
                    "bytes": size_bytes, "median_ms": median * 1000, "algbw_GBps": algbw,
                    "busbw_GBps": algbw * 2 * (world - 1) / world,
                }), flush=True)


if __name__ == "__main__":
    main()
