"""Plan a cluster: evolve partitions scored by the simulated objective of their DP-optimal replicas."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from hexgen.cluster import GIB, Cluster, Machine
from hexgen.costmodel import CostConfig, Workload, stage_memory_bytes
from hexgen.errors import UserError
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan
from hexgen.planner.baselines import symmetric_candidates
from hexgen.planner.evaluate import PlanEvaluator
from hexgen.planner.genetic import GAConfig, Score, SearchResult, evolve
from hexgen.planner.objective import Objective
from hexgen.planner.partition import Group, Partition, by_machine, by_region, make_group, make_partition
from hexgen.sim.metrics import attainment, tail_latency_s
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests


@dataclass(frozen=True)
class PlanRequest:
    """What the plan must serve and what "best" means: rate, deadline, request shape, objective, search settings.

    objective "attainment" maximises SLO attainment at `slo_s` (then the tail); "tail" minimises the latency
    that `target_attainment` of the requests meet, i.e. the lowest deadline reaching that attainment.
    """

    rate_rps: float
    slo_s: float
    workload: Workload = field(default_factory=Workload)
    num_requests: int = 1000
    dispatch: str = "round-robin"
    seed: int = 0
    ga: GAConfig = field(default_factory=GAConfig)
    objective: str = "attainment"
    target_attainment: float = 0.99


def make_evaluator(cluster: Cluster, model: ModelSpec, request: PlanRequest, cfg: CostConfig) -> PlanEvaluator:
    """The evaluator every plan for this request is scored by: the request stream is drawn from `request.seed`."""
    wl = request.workload
    spec = WorkloadSpec(request.rate_rps, request.num_requests, TokenLengths.fixed(wl.prompt_tokens),
                        TokenLengths.fixed(wl.output_tokens))
    requests = generate_requests(spec, random.Random(request.seed))
    objective = Objective(request.objective, request.slo_s, request.target_attainment)
    return PlanEvaluator(cluster, model, requests, objective, cfg, wl, request.dispatch)


@dataclass(frozen=True)
class PlanResult:
    plan: DeploymentPlan
    search: SearchResult
    elapsed_s: float


def initial_partitions(
    cluster: Cluster, model: ModelSpec, workload: Workload, cfg: CostConfig,
    holds_replica: Callable[[Group], bool] | None = None,
) -> list[Partition]:
    """Network-aware starts (a group per region, per machine, or one for all; with `holds_replica`, also every
    machine that holds a replica alone as its own group and the rest pooled per region) plus the groupings of
    every symmetric layout, so the search starts no worse than the best symmetric plan."""
    everything = make_partition([{m.name: m.count for m in cluster.machines}])
    starts = [by_region(cluster), by_machine(cluster), everything]
    if holds_replica is not None:
        starts += [machines_then_region_pools(cluster, holds_replica), packed_region_pools(cluster, holds_replica)]
    starts += [partition_of(p, cluster) for p in symmetric_candidates(cluster, model, workload, cfg)]
    return list(dict.fromkeys(starts))


def _alone_and_pooled(
    cluster: Cluster, holds_replica: Callable[[Group], bool],
) -> tuple[list[dict[str, int]], dict[str, list[Machine]]]:
    """The machines that hold a replica alone, one group each, and the others by region."""
    alone: list[dict[str, int]] = []
    pooled: dict[str, list[Machine]] = {}
    for m in cluster.machines:
        if holds_replica(make_group({m.name: m.count})):
            alone.append({m.name: m.count})
        else:
            pooled.setdefault(m.region, []).append(m)
    return alone, pooled


def packed_region_pools(cluster: Cluster, holds_replica: Callable[[Group], bool]) -> Partition:
    """Machines that hold a replica alone, one group each; the others packed per region, most GPU memory first, into
    groups that just hold a replica (what is left joins the region's last group). A pool of a whole region makes
    one replica and leaves the rest idle: on a large cluster the search would take many generations to split it."""
    groups, pooled = _alone_and_pooled(cluster, holds_replica)
    for machines in pooled.values():
        packed: list[dict[str, int]] = []
        current: dict[str, int] = {}
        for m in sorted(machines, key=lambda m: (-m.count * m.gpu.memory_bytes, m.name)):
            current[m.name] = m.count
            if holds_replica(make_group(current)):
                packed.append(current)
                current = {}
        if current and packed:
            packed[-1].update(current)
        elif current:
            packed.append(current)
        groups += packed
    return make_partition(groups)


def machines_then_region_pools(cluster: Cluster, holds_replica: Callable[[Group], bool]) -> Partition:
    """Machines that hold a replica alone, one group each; the others pooled per region (they may hold a pipeline
    together that none of them holds alone)."""
    groups, pooled = _alone_and_pooled(cluster, holds_replica)
    return make_partition(groups + [{m.name: m.count for m in machines} for machines in pooled.values()])


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
    evaluator = make_evaluator(cluster, model, request, cfg or CostConfig())
    starts = initial_partitions(cluster, model, request.workload, evaluator.cfg,
                                lambda g: evaluator.replica_cost(g, evaluator.levels[-1]) is not None)
    if not any(evaluator.layouts(p) for p in starts):
        raise UserError(_no_replica_message(cluster, model, request.workload, evaluator.cfg))
    result = evolve(starts, evaluator.score, request.ga, random.Random(request.seed), on_generation)
    elapsed = time.perf_counter() - start
    chosen = evaluator.select(result.best)
    latencies = evaluator.latencies_s(evaluator.selected_costs(result.best))
    meta = {"rate_rps": request.rate_rps, "slo_s": request.slo_s, "prompt_tokens": request.workload.prompt_tokens,
            "output_tokens": request.workload.output_tokens, "max_batch": request.workload.max_batch,
            "kv_reserved_seqs": chosen.reserve, "stages_for_throughput": chosen.for_throughput,
            "dispatch": request.dispatch,
            "objective": request.objective, "seed": request.seed, "search_s": round(elapsed, 2),
            "predicted_slo_attainment": attainment(latencies, request.slo_s),
            "predicted_tail_latency_s": round(tail_latency_s(latencies, request.target_attainment), 4)}
    return PlanResult(evaluator.to_plan(result.best, meta), result, elapsed)


def best_symmetric_plan(
    cluster: Cluster, model: ModelSpec, request: PlanRequest, cfg: CostConfig | None = None
) -> tuple[DeploymentPlan, Score]:
    """The symmetric baseline under the same objective, request stream and replica selection as plan_cluster."""
    evaluator = make_evaluator(cluster, model, request, cfg or CostConfig())
    scored = [evaluator.select_plan(p) for p in symmetric_candidates(cluster, model, request.workload, evaluator.cfg)]
    if not scored:
        raise UserError(_no_replica_message(cluster, model, request.workload, evaluator.cfg))
    score, plan = max(scored, key=lambda x: x[0])
    return evaluator.with_predictions(plan), score


def _no_replica_message(cluster: Cluster, model: ModelSpec, workload: Workload, cfg: CostConfig) -> str:
    need = stage_memory_bytes(model, 1, model.num_layers, workload, cfg, is_first=True, is_last=True)
    reserve = cfg.runtime_reserve_gb * GIB
    have = sum(m.count * m.gpu.memory_bytes for m in cluster.machines)
    largest = max(m.gpu.memory_bytes for m in cluster.machines)
    head = (f"the cluster cannot hold even one replica of {model.name}: it needs about {(need - reserve) / GIB:.1f} "
            f"GiB of weights and KV cache plus {cfg.runtime_reserve_gb:.1f} GiB reserve per GPU")
    if largest <= reserve:
        return (f"{head}, and no GPU has more than that reserve (the largest has {largest / GIB:.2f} GiB); use GPUs "
                "with more memory")
    if have >= need:  # enough in all: the pieces a replica can be cut into do not fit on these GPUs
        return (f"{head}; the cluster has {have / GIB:.1f} GiB in all, but no split into whole layers and TP "
                f"degrees that divide the heads fits GPUs of at most {largest / GIB:.1f} GiB each (with per-GPU "
                "overheads); use GPUs with more memory or lower --max-batch / token lengths")
    return (f"{head}, and the cluster has {have / GIB:.1f} GiB in all ({(need - have) / GIB:.1f} GiB missing even "
            "before per-GPU overheads and TP/pipeline divisibility); add GPUs or lower --max-batch / token lengths")
