"""All-reduce through shared memory for a CPU TP group whose ranks share one machine (every TP group does).

gloo's all-reduce goes through loopback TCP: 2(t - 1) messages, each a wake-up of a peer process; on the 2-core
EPYC a decode-sized all-reduce over 3 one-thread ranks took ~1.2 ms as served. Here each rank copies its partial
sum into its own slot of a shared buffer, publishes a call counter, waits (yielding the core) until every rank
has published the same call, and adds the slots up in rank order, so every rank gets bitwise the same sum.

Two sets of slots alternate between calls: a rank can be at most one call ahead of the slowest (it waits for the
slowest before returning), so the set it writes next was read by everyone before. Data is written before the
counter and read after it, which x86's store and load ordering keeps in order (the group is only made on x86).
Tensors larger than a slot go through gloo. The buffer is a file in /dev/shm, unlinked as soon as every rank
has mapped it, so nothing is left behind even if a rank dies.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

SLOT_BYTES = 4 << 20  # per rank and set: a decode step's activations fit; larger prefills use gloo
FLAGS_BYTES = 4096  # one int64 call counter per rank, first
WAIT_LIMIT_S = 120.0  # a peer that never arrives: raise rather than spin forever
SHM_DIR = "/dev/shm"


def usable() -> bool:
    """Shared memory all-reduce needs x86's memory ordering and a /dev/shm."""
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR)


def _create(size: int) -> str | None:
    """A fresh file of `size` bytes in /dev/shm, or None where there is no room (tmpfs too small)."""
    path = os.path.join(SHM_DIR, f"hexgen-allreduce-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # fails now, not with SIGBUS on first touch, when /dev/shm is full
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    return path


def make_shared_allreduce(group: dist.ProcessGroup, tp_rank: int, tp_degree: int) -> SharedMemoryAllReduce | None:
    """Collective over `group`: its shared buffer, or None on every rank where the leader could not make one."""
    size = FLAGS_BYTES + 2 * tp_degree * SLOT_BYTES
    box = [_create(size) if tp_rank == 0 else None]
    dist.broadcast_object_list(box, group_src=0, group=group)
    if box[0] is None:
        return None
    with open(box[0], "r+b") as f:
        mapping = mmap.mmap(f.fileno(), size)
    dist.barrier(group=group)  # every rank has mapped it: the name can go
    if tp_rank == 0:
        os.unlink(box[0])
    return SharedMemoryAllReduce(mapping, tp_rank, tp_degree, box[0])


class SharedMemoryAllReduce:
    """One TP group's shared buffer, as this rank sees it (made by make_shared_allreduce)."""

    def __init__(self, mapping: mmap.mmap, tp_rank: int, tp_degree: int, path: str):
        self.tp_rank, self.tp_degree = tp_rank, tp_degree
        self.path = path  # the name it had in /dev/shm, unlinked once every rank mapped it
        self._map = mapping
        self._flags = np.frombuffer(mapping, dtype=np.int64, count=tp_degree)
        self._calls = 0
        self._slots: dict[torch.dtype, list[list[torch.Tensor]]] = {}  # dtype -> [set][rank] whole-slot views

    def _slot(self, which: int, rank: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The first `numel` elements of a slot; the views are made once per dtype (not on every call)."""
        if dtype not in self._slots:
            count = SLOT_BYTES // torch.tensor([], dtype=dtype).element_size()
            self._slots[dtype] = [[torch.frombuffer(self._map, dtype=dtype, count=count, offset=FLAGS_BYTES + (
                w * self.tp_degree + r) * SLOT_BYTES) for r in range(self.tp_degree)] for w in range(2)]
        return self._slots[dtype][which][rank][:numel]

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() <= SLOT_BYTES and tensor.is_contiguous()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group, in place (the caller checked `fits`)."""
        self._calls += 1
        which, numel = self._calls % 2, tensor.numel()
        flat = tensor.view(-1)
        self._slot(which, self.tp_rank, tensor.dtype, numel).copy_(flat)
        self._flags[self.tp_rank] = self._calls
        self._wait_for(self._calls)
        flat.copy_(self._slot(which, 0, tensor.dtype, numel))
        for rank in range(1, self.tp_degree):
            flat.add_(self._slot(which, rank, tensor.dtype, numel))
        return tensor

    def _wait_for(self, call: int) -> None:
        started = None
        while int(self._flags.min()) < call:
            os.sched_yield()
            if started is None:
                started = time.monotonic()
            elif time.monotonic() - started > WAIT_LIMIT_S:
                raise RuntimeError(f"shared-memory all-reduce: a TP peer did not arrive within {WAIT_LIMIT_S:.0f} s")
