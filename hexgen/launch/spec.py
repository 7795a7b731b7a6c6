"""What a worker process needs to become a rank of a replica (no torch): the replica's Layout and a RankSpec."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hexgen.engine.checkpoint import ModelSource
from hexgen.launch.lifetime import free_port
from hexgen.plan import Replica


@dataclass(frozen=True)
class Layout:
    """A replica's ranks: TP degree and layer range of each stage; ranks are numbered stage by stage."""

    tp_degrees: tuple[int, ...]
    layer_ranges: tuple[tuple[int, int], ...]

    @property
    def world_size(self) -> int:
        return sum(self.tp_degrees)

    @property
    def num_stages(self) -> int:
        return len(self.tp_degrees)

    def first_rank(self, stage: int) -> int:
        return sum(self.tp_degrees[:stage])

    def stage_of(self, rank: int) -> int:
        for stage in range(self.num_stages):
            if rank < self.first_rank(stage) + self.tp_degrees[stage]:
                return stage
        raise ValueError(f"rank {rank} is outside a replica of {self.world_size} ranks")

    def stage_ranks(self, stage: int) -> list[int]:
        first = self.first_rank(stage)
        return list(range(first, first + self.tp_degrees[stage]))

    @property
    def last_leader(self) -> int:
        return self.first_rank(self.num_stages - 1)


def layout_of(replica: Replica) -> Layout:
    return Layout(tuple(s.tp for s in replica.stages), tuple(s.layers for s in replica.stages))


@dataclass(frozen=True)
class RankSpec:
    """Everything one worker process needs to become a rank of a replica."""

    source: ModelSource
    layout: Layout
    rank: int
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL; local GPU index = the stage's gpus entry)
    gpu_index: int = 0
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    master_port: int = 0  # rendezvous port on 127.0.0.1 (multi-rank only)


def rank_specs(
    source: ModelSource, replica: Replica, dtype: str, device: str, threads_per_rank: int | None = None
) -> list[RankSpec]:
    """One RankSpec per rank. CPU threads: given, else this machine's cores split over the replica's ranks
    (a one-rank replica keeps torch's default)."""
    layout = layout_of(replica)
    world = layout.world_size
    if threads_per_rank is None:
        threads_per_rank = 0 if world == 1 else max(1, (os.cpu_count() or 1) // world)
    port = free_port() if world > 1 else 0
    specs = []
    for stage in replica.stages:
        for gpu in stage.gpus:
            specs.append(RankSpec(source, layout, len(specs), dtype, device, gpu, threads_per_rank, port))
    return specs
