"""Rank layout of one replica and its process groups, created on every rank in one fixed order.

Glossary (one replica, stages numbered 0..S-1, stage s has TP degree t_s):
  rank        global rank inside the replica; ranks are numbered stage by stage, so stage s owns
              ranks [sum(t[:s]), sum(t[:s+1]))
  stage       index of the pipeline stage this rank belongs to
  tp_rank     position of this rank inside its stage's TP group (0 = the stage leader)
  tp_degree   size of the stage's TP group
  leader      tp_rank 0 of a stage: the only rank that exchanges activations with neighbour stages
  driver      rank 0 (leader of stage 0): runs the batch scheduler and talks to the outside

Groups, created in this order on every rank: one TP group per stage (stage 0 first), then (NCCL only) one
gloo twin of each TP group for step plans, then the control group spanning the replica on gloo (plans and
sampled tokens between stage leaders, set-up agreements).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hexgen.engine.shm_allreduce import SharedMemoryAllReduce, make_shared_allreduce, usable
from hexgen.launch.spec import Layout


@dataclass(frozen=True)
class TPGroup:
    """This rank's view of its stage's tensor-parallel group; `group` is None when tp_degree == 1.
    `cpu_group` spans the same ranks on gloo, for step plans (the same group when the backend is gloo). `shared`:
    on CPU, the group's shared-memory all-reduce (engine/shm_allreduce.py), used for tensors that fit its slots."""

    tp_rank: int
    tp_degree: int
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    shared: SharedMemoryAllReduce | None = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum partial results of a row-parallel layer across the stage (in place)."""
        if self.tp_degree > 1:
            if self.shared is not None and self.shared.fits(tensor):
                return self.shared.all_reduce(tensor)
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather_to_leader(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's equal-shaped shard, in tp_rank order, on the leader; None elsewhere."""
        if self.tp_degree == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.tp_degree)] if self.tp_rank == 0 else None
        dist.gather(tensor, parts, group_dst=0, group=self.group)
        return parts

    def broadcast_from_leader(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.tp_degree > 1:
            dist.broadcast(tensor, group_src=0, group=self.group)
        return tensor


@dataclass(frozen=True)
class RankContext:
    """Everything a rank knows about its place in the replica."""

    layout: Layout
    rank: int
    tp: TPGroup
    control: dist.ProcessGroup | None  # gloo group over the whole replica; None in a one-process run

    @property
    def stage(self) -> int:
        return self.layout.stage_of(self.rank)

    @property
    def layers(self) -> tuple[int, int]:
        return self.layout.layer_ranges[self.stage]

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.num_stages - 1

    @property
    def is_leader(self) -> bool:
        return self.tp.tp_rank == 0

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def prev_leader(self) -> int:
        return self.layout.first_rank(self.stage - 1)

    @property
    def next_leader(self) -> int:
        return self.layout.first_rank(self.stage + 1)


def single_process_context(layout: Layout) -> RankContext:
    """The whole model in this process: one stage, TP degree 1, no torch.distributed."""
    if layout.world_size != 1:
        raise ValueError("a single-process context needs a layout of one stage with TP degree 1")
    return RankContext(layout, 0, TPGroup(0, 1), None)


def init_rank_context(layout: Layout, rank: int, backend: str, gloo_timeout: timedelta | None = None) -> RankContext:
    """Create every group on this rank, in the glossary's order; call after init_process_group. `gloo_timeout`:
    how long a rank may wait in a gloo group's operation (torch's default when None)."""
    gloo = {"backend": "gloo", "timeout": gloo_timeout}
    groups = [dist.new_group(layout.stage_ranks(s), **(gloo if backend == "gloo" else {"backend": backend}))
              for s in range(layout.num_stages)]
    cpu_groups = groups
    if backend != "gloo":
        cpu_groups = [dist.new_group(layout.stage_ranks(s), **gloo) for s in range(layout.num_stages)]
    stage = layout.stage_of(rank)
    ranks = layout.stage_ranks(stage)
    tp_group = TPGroup(0, 1)
    if len(ranks) > 1:
        tp_rank = ranks.index(rank)
        shared = None
        if backend == "gloo" and usable() and os.environ.get("HEXGEN_SHM_ALLREDUCE", "1") != "0":
            shared = make_shared_allreduce(groups[stage], tp_rank, len(ranks))
        tp_group = TPGroup(tp_rank, len(ranks), groups[stage], cpu_groups[stage], shared)
    control = dist.new_group(list(range(layout.world_size)), **gloo)
    return RankContext(layout, rank, tp_group, control)
