"""Plan a cluster: score partitions by simulated SLO attainment of their DP-optimal replicas, evolve the best."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from hexgen.cluster import GIB, Cluster
from hexgen.costmodel import CostConfig, StagePlacement, Workload, replica_cost, stage_memory_bytes
from hexgen.dispatch import make_policy
from hexgen.errors import UserError
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan
from hexgen.planner.baselines import symmetric_candidates
from hexgen.planner.build import build_plan
from hexgen.planner.dp import PipelineLayout, PipelineSolver
from hexgen.planner.genetic import GAConfig, Score, SearchResult, evolve
from hexgen.planner.partition import Group, Partition, by_machine, by_region, make_partition
from hexgen.planner.pricing import StagePricer
from hexgen.sim.metrics import attainment
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests


@dataclass(frozen=True)
class PlanRequest:
    """What the plan must serve: request rate, end-to-end deadline, request shape, search settings."""

    rate_rps: float
    slo_s: float
    workload: Workload = field(default_factory=Workload)
    num_requests: int = 1000
    dispatch: str = "round-robin"
    seed: int = 0
    ga: GAConfig = field(default_factory=GAConfig)


class PlanEvaluator:
    """Partition -> replicas (one DP layout per feasible group) -> simulated score; everything memoised."""

    def __init__(self, cluster: Cluster, model: ModelSpec, request: PlanRequest, cfg: CostConfig):
        self.cluster, self.model, self.request, self.cfg = cluster, model, request, cfg
        self.solver = PipelineSolver(StagePricer(cluster, model, request.workload, cfg))
        wl = request.workload
        spec = WorkloadSpec(request.rate_rps, request.num_requests, TokenLengths.fixed(wl.prompt_tokens),
                            TokenLengths.fixed(wl.output_tokens))
        self.requests = generate_requests(spec, random.Random(request.seed))
        self.replica_model = cache(self._replica_model)

    def layouts(self, partition: Partition) -> list[PipelineLayout]:
        found = [self.solver.best(g) for g in partition]
        return [layout for layout in found if layout is not None]

    def _replica_model(self, group: Group) -> ReplicaModel | None:
        layout = self.solver.best(group)
        if layout is None:
            return None
        c = self.cluster
        stages = [StagePlacement(s.machine, c.machine(s.machine).gpu, s.tp_degree, s.num_layers,
                                 c.link(s.machine, s.machine)) for s in layout.stages]
        return ReplicaModel(replica_cost(c, self.model, stages, self.cfg), self.request.workload.max_batch)

    def score(self, partition: Partition) -> Score:
        """(SLO attainment, -mean latency): meet the deadline first, then be fast."""
        models = [m for m in (self.replica_model(g) for g in partition) if m is not None]
        if not models:
            return (0.0, -float("inf"))
        done = simulate(models, self.requests, make_policy(self.request.dispatch))
        arr = np.array([c.latency_s for c in done])
        return (attainment(arr, self.request.slo_s), -float(arr.mean()))

    def to_plan(self, partition: Partition, meta: dict | None = None) -> DeploymentPlan:
        return build_plan(self.model.name, self.layouts(partition), meta)


@dataclass(frozen=True)
class PlanResult:
    plan: DeploymentPlan
    search: SearchResult
    elapsed_s: float


def initial_partitions(cluster: Cluster, model: ModelSpec, workload: Workload, cfg: CostConfig) -> list[Partition]:
    """Network-aware starts (a group per region, per machine, or one for all) plus the groupings of every
    symmetric layout, so the search starts no worse than the best symmetric plan."""
    everything = make_partition([{m.name: m.count for m in cluster.machines}])
    starts = [by_region(cluster), by_machine(cluster), everything]
    starts += [partition_of(p, cluster) for p in symmetric_candidates(cluster, model, workload, cfg)]
    return list(dict.fromkeys(starts))


def partition_of(plan: DeploymentPlan, cluster: Cluster) -> Partition:
    """The grouping a plan uses: one group per replica, GPUs it leaves idle grouped per machine."""
    groups = [dict(Counter(s.machine for s in r.stages for _ in s.gpus)) for r in plan.replicas]
    used = Counter(s.machine for r in plan.replicas for s in r.stages for _ in s.gpus)
    groups += [{m.name: m.count - used[m.name]} for m in cluster.machines if m.count > used[m.name]]
    return make_partition(groups)


def plan_cluster(
    cluster: Cluster, model: ModelSpec, request: PlanRequest, cfg: CostConfig | None = None,
    on_generation: Callable[[int, Score], None] | None = None,
) -> PlanResult:
    """Search for the plan with the highest simulated SLO attainment; raise if no replica fits at all."""
    start = time.perf_counter()
    evaluator = PlanEvaluator(cluster, model, request, cfg or CostConfig())
    starts = initial_partitions(cluster, model, request.workload, evaluator.cfg)
    if not any(evaluator.layouts(p) for p in starts):
        raise UserError(_no_replica_message(cluster, model, request.workload, evaluator.cfg))
    result = evolve(starts, evaluator.score, request.ga, random.Random(request.seed), on_generation)
    elapsed = time.perf_counter() - start
    meta = {"rate_rps": request.rate_rps, "slo_s": request.slo_s, "prompt_tokens": request.workload.prompt_tokens,
            "output_tokens": request.workload.output_tokens, "max_batch": request.workload.max_batch,
            "seed": request.seed, "search_s": round(elapsed, 2), "predicted_slo_attainment": result.best_score[0]}
    return PlanResult(evaluator.to_plan(result.best, meta), result, elapsed)


def _no_replica_message(cluster: Cluster, model: ModelSpec, workload: Workload, cfg: CostConfig) -> str:
    need = stage_memory_bytes(model, 1, model.num_layers, workload, cfg, is_first=True, is_last=True)
    reserve = cfg.runtime_reserve_gb * GIB
    have = sum(m.count * m.gpu.memory_bytes for m in cluster.machines)
    weights_and_kv = need - reserve
    return (
        f"the cluster cannot hold even one replica of {model.name}: it needs about {weights_and_kv / GIB:.1f} GiB "
        f"of weights and KV cache plus {cfg.runtime_reserve_gb:.1f} GiB reserve per GPU, and the cluster has "
        f"{have / GIB:.1f} GiB in all ({max(0.0, need - have) / GIB:.1f} GiB missing even before per-GPU overheads "
        f"and TP/pipeline divisibility); add GPUs or lower --max-batch / token lengths"
    )
