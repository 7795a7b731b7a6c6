"""A whole replica's step times: its stages in order plus the links between them and the token return."""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.cluster import Cluster, GpuType, Link
from hexgen.costmodel.linear import LinearCost
from hexgen.costmodel.params import CostConfig, Workload
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
    """A plan replica's stages as placements (TP groups lie inside one machine, so their link is intra-machine)."""
    return [
        StagePlacement(s.machine, cluster.machine(s.machine).gpu, s.tp, s.num_layers,
                       cluster.link(s.machine, s.machine))
        for s in replica.stages
    ]


def replica_cost(
    cluster: Cluster, model: ModelSpec, stages: list[StagePlacement], cfg: CostConfig
) -> LinearCost:
    """Stages run one after another for a step: sum their times, the hops between them and the token return."""
    total = LinearCost()
    last = len(stages) - 1
    for j, st in enumerate(stages):
        total = total + stage_cost(
            model, st.gpu, st.tp_degree, st.num_layers, st.tp_link, cfg, is_first=j == 0, is_last=j == last
        )
        if j > 0:
            total = total + transfer_cost(model, cluster.link(stages[j - 1].machine, st.machine), cfg)
    if last > 0:
        total = total + token_return_cost(cluster.link(stages[last].machine, stages[0].machine))
    return total


def request_latency_s(
    cluster: Cluster, model: ModelSpec, replica: Replica, workload: Workload, cfg: CostConfig
) -> float:
    """Seconds one request of the workload's shape takes on an otherwise idle replica."""
    cost = replica_cost(cluster, model, placements_of(replica, cluster), cfg)
    return cost.request_latency_s(workload.prompt_tokens, workload.output_tokens)
