"""What a worker process needs to become a rank of a replica (no torch): the replica's Layout and a RankSpec."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hexgen.engine.checkpoint import ModelSource
from hexgen.launch.lifetime import free_port
from hexgen.plan import Replica


@dataclass(frozen=True)
class Layout:
    """A replica's ranks: TP degree and layer range of each stage; ranks are numbered stage by stage.
    `depth`: micro-batches the driver keeps in flight (0 = one per stage)."""

    tp_degrees: tuple[int, ...]
    layer_ranges: tuple[tuple[int, int], ...]
    depth: int = 0

    @property
    def micro_batches(self) -> int:
        return self.depth or self.num_stages

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


def layout_of(replica: Replica, device: str) -> Layout:
    return Layout(tuple(s.tp for s in replica.stages), tuple(s.layers for s in replica.stages),
                  pipeline_depth(replica, device))


def pipeline_depth(replica: Replica, device: str) -> int:
    """Micro-batches worth keeping in flight: one per stage where every stage has its own devices (GPUs); on
    CPUs the stages on one machine share its cores, so one per machine. Two stages on one 2-core machine,
    measured (SmolLM2-135M fp32, 16 streams): taking turns with 2 threads each serves 162 tok/s, overlapping
    with 1 thread each 139 (two half batches cost more per token than one whole batch on both cores)."""
    return len(replica.stages) if device == "cuda" else len({s.machine for s in replica.stages})


def cpu_threads_per_rank(replicas: list[Replica], cores: int) -> int:
    """Torch threads of each CPU rank when `replicas` share one machine of `cores` cores: the replicas run at
    once, and inside each only one stage works at a time (see pipeline_depth), so the cores are split over
    the largest TP group of every replica."""
    return max(1, cores // sum(max(s.tp for s in r.stages) for r in replicas))


def alone_on_cpu(replicas: list[Replica], device: str) -> bool:
    """Whether the replicas sharing one CPU machine are a single rank (it may let its threads spin at barriers:
    nothing else needs the cores between its parallel regions; see launch/entry.py)."""
    return device == "cpu" and sum(s.tp for r in replicas for s in r.stages) == 1


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
    spin_wait: bool = False  # the only rank on its CPU machine: its threads spin briefly at barriers (launch/entry.py)


def rank_specs(
    source: ModelSource, replica: Replica, dtype: str, device: str, threads_per_rank: int | None = None,
    spin_wait: bool = False,
) -> list[RankSpec]:
    """One RankSpec per rank. CPU threads: given, else this machine's cores as the replica alone would use them
    (a one-rank replica keeps torch's default). spin_wait: for a rank alone on its CPU machine."""
    layout = layout_of(replica, device)
    world = layout.world_size
    if threads_per_rank is None:
        threads_per_rank = 0 if world == 1 else cpu_threads_per_rank([replica], os.cpu_count() or 1)
    port = free_port() if world > 1 else 0
    specs = []
    for stage in replica.stages:
        for gpu in stage.gpus:
            specs.append(RankSpec(source, layout, len(specs), dtype, device, gpu, threads_per_rank, port, spin_wait))
    return specs
