"""What each spawned rank of test_shm_allreduce runs: the same tensors summed by the shared-memory all-reduce and
by gloo's, many calls in a row, saved for the parent to compare with the sum computed there."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from hexgen.engine.shm_allreduce import SLOT_BYTES, make_shared_allreduce

# (rows, columns, dtype): decode- and prefill-sized, one larger than a slot (gloo takes it)
SHAPES = [(1, 576, torch.float32), (16, 576, torch.float32), (37, 64, torch.bfloat16), (3, 5, torch.float32),
          (SLOT_BYTES // (4 * 64) + 1, 64, torch.float32)]
CALLS = 40


def inputs(rank: int) -> list[torch.Tensor]:
    """Every call's input on `rank` (seeded: the parent rebuilds them)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(r, c, generator=gen).to(dtype) for r, c, dtype in SHAPES for _ in range(CALLS // len(SHAPES))]


def shm_rank(rank: int, port: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    group = dist.new_group(list(range(world_size)))
    shared = make_shared_allreduce(group, rank, world_size)
    assert shared is not None
    dist.barrier(group=group)
    assert not os.path.exists(shared.path)  # unlinked as soon as every rank mapped it
    via_shm, via_gloo, used = [], [], []
    for x in inputs(rank):
        used.append(shared.fits(x))
        via_shm.append(shared.all_reduce(x.clone()) if used[-1] else None)
        y = x.clone()
        dist.all_reduce(y, group=group)
        via_gloo.append(y)
    torch.save({"shm": via_shm, "gloo": via_gloo, "used": used}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
