"""A whole replica's step times: each stage, the hops between stages, the token return, and its KV pool."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from hexgen.cluster import Cluster, GpuType, Link
from hexgen.costmodel.linear import LinearCost
from hexgen.costmodel.memory import kv_pool_blocks
from hexgen.costmodel.params import CostConfig, Workload
from hexgen.costmodel.pipeline import ReplicaCost
from hexgen.costmodel.stage import stage_cost, token_return_cost, transfer_cost
from hexgen.models import ModelSpec
from hexgen.plan import Replica


@dataclass(frozen=True)
class StagePlacement:
    """What the cost model needs of a stage: where its leader runs, its GPU type, TP degree, layers, TP link."""

    machine: str
    gpu: GpuType
    tp_degree: int
    num_layers: int
    tp_link: Link


def placements_of(replica: Replica, cluster: Cluster) -> list[StagePlacement]:
    """A plan replica's stages as placements (TP groups lie inside one machine)."""
    return [
        StagePlacement(s.machine, cluster.machine(s.machine).gpu, s.tp, s.num_layers, cluster.tp_link(s.machine))
        for s in replica.stages
    ]


def replica_stage_costs(
    cluster: Cluster, model: ModelSpec, stages: list[StagePlacement], cfg: CostConfig, workload: Workload | None = None
) -> ReplicaCost:
    """Every stage's own step time, the hop into each later stage, the token return and the KV pool in blocks
    (the tightest stage's; every rank of a replica gets the same count). Without a workload no pool is sized."""
    last = len(stages) - 1
    costs, hops, pools = [], [], []
    for j, st in enumerate(stages):
        cost, pool = _placed_stage(model, st, cfg, workload, j == 0, j == last)
        costs.append(cost)
        if j > 0:
            hops.append(transfer_cost(model, cluster.link(stages[j - 1].machine, st.machine), cfg))
        if pool is not None:
            pools.append(pool)
    back = token_return_cost(cluster.link(stages[last].machine, stages[0].machine)) if last > 0 else LinearCost()
    return ReplicaCost(tuple(costs), tuple(hops), back, min(pools) if pools else None, cfg.kv_block_tokens)


@lru_cache(maxsize=8192)  # pure; the planner prices thousands of pipelines made of the same few stages
def _placed_stage(model: ModelSpec, st: StagePlacement, cfg: CostConfig, workload: Workload | None, is_first: bool,
                  is_last: bool) -> tuple[LinearCost, int | None]:
    """A stage's step time and, given a workload, its rank's KV pool in blocks."""
    cost = stage_cost(model, st.gpu, st.tp_degree, st.num_layers, st.tp_link, cfg, is_first=is_first, is_last=is_last)
    if workload is None:
        return cost, None
    return cost, kv_pool_blocks(model, st.tp_degree, st.num_layers, st.gpu.memory_gb, workload, cfg,
                                is_first=is_first, is_last=is_last)


def replica_cost(
    cluster: Cluster, model: ModelSpec, stages: list[StagePlacement], cfg: CostConfig
) -> LinearCost:
    """Stages one after another for a step (no overlap): their times, the hops between them and the token return."""
    return replica_stage_costs(cluster, model, stages, cfg).sequential


def request_latency_s(
    cluster: Cluster, model: ModelSpec, replica: Replica, workload: Workload, cfg: CostConfig
) -> float:
    """Seconds one request of the workload's shape takes on an otherwise idle replica."""
    cost = replica_cost(cluster, model, placements_of(replica, cluster), cfg)
    return cost.request_latency_s(workload.prompt_tokens, workload.output_tokens)
