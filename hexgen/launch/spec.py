"""What a worker process needs to become a rank of a replica (no torch): the replica's Layout and a RankSpec."""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.engine.checkpoint import ModelSource
from hexgen.launch.lifetime import free_port
from hexgen.machine import usable_cores
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


# libgomp spin iterations at a barrier before a CPU rank's OpenMP threads sleep (GOMP_SPINCOUNT, set by
# launch/entry.py before torch loads; hexgen/engine/__init__.py makes 0, sleeping at once, the default otherwise).
# Serving SmolLM2-135M fp32 on the 2-core EPYC:
# - a rank alone on the machine: ~2 ms (libgomp's own default when no wait policy is set is 300000). Two runs each:
#   26.3 / 27.2 -> 27.7 / 28.2 tok/s at 1 stream and 194 / 197 -> 202 / 203 at 16 over sleeping at once.
# - ranks that share the cores at once (replicas side by side): ~0.1 ms, long enough to bridge most gaps between
#   parallel regions, short enough to leave the cores soon to the other ranks. Measured first on stages taking
#   turns: the two-stage TP 1 | TP 1 pipeline at 16 streams, eight rounds, each against sleeping at once on the
#   same server: +2.4, +2.9, +2.7, +0.8, +0.6, +1.7, +1.1, +3.7% tok/s; at 1 stream +1.6, +5.9, +3.6, +8.9, +2.0%;
#   1,000 and 3,000 spins gained less, 30,000 nothing, and the lone rank's ~2 ms lost (24.3 -> 21.1 tok/s at 1
#   stream: the threads of the stage whose turn has ended keep the cores from the next).
# - stages of one replica taking turns on a machine's cores (takes_turns) spin as long as a lone rank: each releases
#   its worker threads when its turn ends (engine/turns.py), so no spinning keeps the cores from the next stage,
#   and none sleeps inside a turn (at ~0.1 ms they slept ~18 times a turn of 15 layers on the Xeon of 2026-12-01).
ALONE_SPIN_COUNT = 200_000
SHARED_SPIN_COUNT = 10_000


def alone_on_cpu(replicas: list[Replica], device: str) -> bool:
    """Whether the replicas sharing one CPU machine are a single rank (nothing else needs the cores between its
    parallel regions)."""
    return device == "cpu" and sum(s.tp for r in replicas for s in r.stages) == 1


def takes_turns(replicas: list[Replica], device: str) -> bool:
    """Whether the CPU ranks of `replicas` sharing one machine are the stages of a single replica, which take turns
    on its cores (pipeline_depth), each ending its turn by releasing its worker threads (engine/turns.py)."""
    return device == "cpu" and len(replicas) == 1 and len(replicas[0].stages) > 1


def omp_spin_count(replicas: list[Replica], device: str) -> int:
    """GOMP_SPINCOUNT for the CPU ranks of `replicas` sharing one machine (0 on GPUs: their ranks' CPU threads
    only launch kernels)."""
    if device != "cpu":
        return 0
    alone = alone_on_cpu(replicas, device) or takes_turns(replicas, device)
    return ALONE_SPIN_COUNT if alone else SHARED_SPIN_COUNT


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
    master_port: int = 0  # rendezvous port on master_addr (multi-rank only)
    spin_count: int = 0  # GOMP_SPINCOUNT of its OpenMP threads (omp_spin_count; 0 = sleep at barriers at once)
    end_turns: bool = False  # release its OpenMP worker threads after each micro-batch (takes_turns)
    master_addr: str = "127.0.0.1"  # where rank 0 listens: this machine, or rank 0's Ray node


def rank_specs(
    source: ModelSource, replica: Replica, dtype: str, device: str, threads_per_rank: int | None = None,
    spin_count: int | None = None, end_turns: bool | None = None,
) -> list[RankSpec]:
    """One RankSpec per rank. CPU threads: given, else this machine's cores as the replica alone would use them
    (a one-rank replica keeps torch's default). Spin count and whether its ranks end turns: given, else as for this
    replica alone on one machine."""
    layout = layout_of(replica, device)
    world = layout.world_size
    if threads_per_rank is None:
        threads_per_rank = 0 if world == 1 else cpu_threads_per_rank([replica], usable_cores())
    if spin_count is None:
        spin_count = omp_spin_count([replica], device)
    if end_turns is None:
        end_turns = takes_turns([replica], device)
    port = free_port() if world > 1 else 0
    specs = []
    for stage in replica.stages:
        for gpu in stage.gpus:
            specs.append(RankSpec(source, layout, len(specs), dtype, device, gpu, threads_per_rank, port, spin_count,
                                  end_turns))
    return specs
