"""Time the two collectives a split model adds, on the real backend: the stage-boundary send/recv of
activations [T, H] and the TP all-reduce of [T, H], each with a fresh process per rank."""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hexgen.launch.lifetime import free_port

WARMUP = 5


def _rank(
    rank: int, world: int, port: int, hidden: int, tokens: list[int], dtype: torch.dtype, iters: int, out
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for t in tokens:
        x = torch.randn(t, hidden, dtype=dtype)
        if world == 2:
            results[("p2p", t)] = _time(lambda x=x: _ping_pong(rank, x), iters) / 2  # one way
        results[("all_reduce", t)] = _time(lambda x=x: dist.all_reduce(x), iters)
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _ping_pong(rank: int, x: torch.Tensor) -> None:
    if rank == 0:
        dist.send(x, 1)
        dist.recv(x, 1)
    else:
        dist.recv(x, 0)
        dist.send(x, 0)


def _time(fn, iters: int) -> float:
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_collectives(
    world: int, hidden: int, tokens: list[int], dtype: torch.dtype, iters: int = 50
) -> dict[tuple[str, int], float]:
    """Median seconds per op: ("p2p", T) one-way (world 2 only) and ("all_reduce", T) over `world` ranks."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, hidden, tokens, dtype, iters, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = out.get(timeout=300)
    for p in procs:
        p.join(30)
    return results
