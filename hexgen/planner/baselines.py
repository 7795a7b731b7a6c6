"""Comparison plans: symmetric layouts (one TP degree, even layer split, identical replicas) and fixed shapes."""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.cluster import Cluster, GpuType, Link, Machine, single_machine_cluster
from hexgen.costmodel import CostConfig, StagePlacement, Workload, replica_cost, stage_memory_bytes
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan, Replica, Stage
from hexgen.planner.dp import PipelineSolver
from hexgen.planner.pricing import StagePricer

MAX_SYMMETRIC_STAGES = 16


def even_split(num_layers: int, num_stages: int) -> list[int]:
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if i < extra else 0) for i in range(num_stages)]


def _fits(model: ModelSpec, gpu: GpuType, tp: int, layers: int, wl: Workload, cfg: CostConfig, j: int, n: int) -> bool:
    used = stage_memory_bytes(model, tp, layers, wl, cfg, is_first=j == 0, is_last=j == n - 1)
    return used <= gpu.memory_bytes


def symmetric_plan(
    cluster: Cluster, model: ModelSpec, tp_degree: int, num_stages: int, workload: Workload, cfg: CostConfig
) -> DeploymentPlan | None:
    """As many identical replicas of `num_stages` stages x TP `tp_degree` (even layers) as fit.

    TP groups are blocks of GPUs inside one machine; replicas chain blocks of one region where possible,
    then the leftovers in (region, machine) order. A block joins a replica only where its layers fit.
    """
    blocks: list[tuple[Machine, int]] = []  # (machine, first GPU index)
    for m in sorted(cluster.machines, key=lambda m: (m.region, -m.gpu.memory_gb, m.name)):
        blocks += [(m, i * tp_degree) for i in range(m.count // tp_degree)]
    split = even_split(model.num_layers, num_stages)
    replicas: list[Replica] = []
    for same_region in (True, False):
        current: list[tuple[Machine, int]] = []
        for block in list(blocks):
            if current and same_region and block[0].region != current[0][0].region:
                current = []
            j = len(current)
            if _fits(model, block[0].gpu, tp_degree, split[j], workload, cfg, j, num_stages):
                current.append(block)
            if len(current) == num_stages:
                replicas.append(_replica(current, tp_degree, split))
                for b in current:
                    blocks.remove(b)
                current = []
    if not replicas:
        return None
    return DeploymentPlan(model.name, tuple(replicas), {"layout": f"symmetric {num_stages} x TP {tp_degree}"})


def _replica(blocks: list[tuple[Machine, int]], tp: int, split: list[int]) -> Replica:
    stages, first = [], 0
    for (machine, gpu0), layers in zip(blocks, split, strict=True):
        stages.append(Stage(machine.name, tuple(range(gpu0, gpu0 + tp)), tp, (first, first + layers)))
        first += layers
    return Replica(tuple(stages))


def symmetric_candidates(
    cluster: Cluster, model: ModelSpec, workload: Workload, cfg: CostConfig
) -> list[DeploymentPlan]:
    """Every symmetric shape that places at least one replica."""
    largest = max(m.count for m in cluster.machines)
    out = []
    for tp in model.valid_tp_degrees(largest):
        for stages in range(1, min(model.num_layers, cluster.num_gpus // tp, MAX_SYMMETRIC_STAGES) + 1):
            plan = symmetric_plan(cluster, model, tp, stages, workload, cfg)
            if plan is not None:
                out.append(plan)
    return out


def reference_latency_s(model: ModelSpec, workload: Workload, cfg: CostConfig, gpu: GpuType, count: int = 8) -> float:
    """One request's latency on the best pipeline of one machine of `count` GPUs (the SLO-scale reference)."""
    nvlink = Link(4800.0, 0.005)
    cluster = single_machine_cluster(gpu, count, "reference")
    cluster = Cluster(cluster.machines, type(cluster.network)(nvlink, nvlink, nvlink))
    layout = PipelineSolver(StagePricer(cluster, model, workload, cfg)).best((("reference", count),))
    if layout is None:
        raise ValueError(f"{model.name} does not fit on {count} x {gpu.name}")
    return layout.latency_s


@dataclass(frozen=True)
class FixedStage:
    """A hand-chosen stage for what-if layouts; its TP group may span machines (the slowest link is used)."""

    machines: tuple[str, ...]  # machine of each GPU in the TP group
    num_layers: int


def fixed_layout_latency_s(
    cluster: Cluster, model: ModelSpec, stages: list[FixedStage], workload: Workload, cfg: CostConfig
) -> tuple[float, list[str]]:
    """Request latency of a hand-chosen layout, and the stages that run out of memory (empty when it fits)."""
    placements, oom = [], []
    for j, st in enumerate(stages):
        gpus = [cluster.machine(m).gpu for m in st.machines]
        slowest = min(gpus, key=lambda g: (g.bandwidth_gbs, g.memory_gb))
        smallest = min(gpus, key=lambda g: g.memory_gb)
        links = [cluster.link(a, b) for a in st.machines for b in st.machines]
        tp_link = min(links, key=lambda lk: (lk.bandwidth_gbps, -lk.latency_ms))
        tp = len(st.machines)
        placements.append(StagePlacement(st.machines[0], slowest, tp, st.num_layers, tp_link))
        if not _fits(model, smallest, tp, st.num_layers, workload, cfg, j, len(stages)):
            oom.append(f"stage {j} ({st.num_layers} layers on {smallest.name} at TP {tp})")
    cost = replica_cost(cluster, model, placements, cfg)
    return cost.request_latency_s(workload.prompt_tokens, workload.output_tokens), oom
