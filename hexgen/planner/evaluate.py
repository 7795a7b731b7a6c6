"""Score a partition (or any set of replicas): DP layout per group, then the best fastest-first subset, simulated.

Replicas are put in rotation order fastest first, and the k fastest are used for the k that scores best (the
others stay idle): at light load a few fast replicas beat a round-robin over slow ones. For batch-1 replicas
under round-robin this makes the score monotone: replacing replicas by faster ones, or offering extra ones,
never lowers it, since every request then finishes no later. A symmetric plan's grouping, re-laid out by the
DP, therefore scores at least as well as the symmetric plan itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from hexgen.cluster import Cluster
from hexgen.costmodel import CostConfig, LinearCost, StagePlacement, Workload, placements_of, replica_cost
from hexgen.dispatch import make_policy
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan
from hexgen.planner.build import build_plan
from hexgen.planner.dp import PipelineLayout, PipelineSolver
from hexgen.planner.genetic import Score
from hexgen.planner.objective import Objective
from hexgen.planner.partition import Group, Partition
from hexgen.planner.pricing import StagePricer
from hexgen.sim.closed_form import RoundRobinQueues
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import Request


@dataclass(frozen=True)
class Selection:
    """The replicas to run, fastest first, and their score."""

    score: Score
    order: tuple[int, ...]  # indices into the candidate replicas, in rotation order


class PlanEvaluator:
    """Partition -> replicas (one DP layout per feasible group) -> best subset's simulated score; memoised."""

    def __init__(self, cluster: Cluster, model: ModelSpec, requests: list[Request], objective: Objective,
                 cfg: CostConfig, workload: Workload, dispatch: str = "round-robin"):
        self.cluster, self.model, self.cfg, self.workload = cluster, model, cfg, workload
        self.objective, self.dispatch, self.requests = objective, dispatch, requests
        self.solver = PipelineSolver(StagePricer(cluster, model, workload, cfg))
        self._queues = RoundRobinQueues(requests) if self._is_closed_form else None
        self.replica_cost = cache(self._replica_cost)
        self.select = cache(self._select_partition)

    @property
    def _is_closed_form(self) -> bool:
        return self.dispatch == "round-robin" and self.workload.max_batch == 1

    def _replica_cost(self, group: Group) -> LinearCost | None:
        layout = self.solver.best(group)
        if layout is None:
            return None
        c = self.cluster
        stages = [StagePlacement(s.machine, c.machine(s.machine).gpu, s.tp_degree, s.num_layers,
                                 c.link(s.machine, s.machine)) for s in layout.stages]
        return replica_cost(c, self.model, stages, self.cfg)

    def score(self, partition: Partition) -> Score:
        return self.select(partition).score

    def _select_partition(self, partition: Partition) -> Selection:
        return self.select_replicas([self.replica_cost(g) for g in partition])

    def select_replicas(self, costs: list[LinearCost | None]) -> Selection:
        """The best-scoring k fastest of the candidate replicas (None: a group that holds no replica)."""
        wl = self.workload
        ranked = sorted((c.batch_time_s(wl.max_batch, wl.prompt_tokens, wl.output_tokens), i)
                        for i, c in enumerate(costs) if c is not None)
        if not ranked:
            return Selection(self.objective.score(np.array([])), ())
        order = [i for _, i in ranked]
        best: Selection | None = None
        for k in self._sizes([costs[i] for i in order]):
            score = self.objective.score(self.latencies_s([costs[i] for i in order[:k]]))
            if best is None or score > best.score:
                best = Selection(score, tuple(order[:k]))
        return best

    def _sizes(self, ranked: list[LinearCost]) -> range:
        """Every k for the closed form; the event simulator skips k whose capacity is below the request rate."""
        if self._is_closed_form:
            return range(1, len(ranked) + 1)
        span_s = max(r.arrival_s for r in self.requests) or 1.0
        rate = len(self.requests) / span_s
        capacity = np.cumsum([ReplicaModel(c, self.workload.max_batch).capacity_weight(
            self.workload.prompt_tokens, self.workload.output_tokens) for c in ranked])
        stable = np.nonzero(capacity >= rate)[0]
        return range(int(stable[0]) + 1 if len(stable) else 1, len(ranked) + 1)

    def latencies_s(self, costs: list[LinearCost]) -> np.ndarray:
        if self._queues is not None:
            return self._queues.latencies_s(costs)
        models = [ReplicaModel(c, self.workload.max_batch) for c in costs]
        return np.array([c.latency_s for c in simulate(models, self.requests, make_policy(self.dispatch))])

    def layouts(self, partition: Partition) -> list[PipelineLayout]:
        """The DP layouts of the selected replicas, in rotation order."""
        return [self.solver.best(partition[i]) for i in self.select(partition).order]

    def to_plan(self, partition: Partition, meta: dict | None = None) -> DeploymentPlan:
        return self.with_predictions(build_plan(self.model.name, self.layouts(partition), meta))

    def with_predictions(self, plan: DeploymentPlan) -> DeploymentPlan:
        """Each replica's predicted latency of one request alone and throughput at full batch (requests/s);
        the server's capacity-weighted dispatch reads the throughput."""
        wl = self.workload
        replicas = []
        for replica in plan.replicas:
            cost = replica_cost(self.cluster, self.model, placements_of(replica, self.cluster), self.cfg)
            batch_s = cost.batch_time_s(wl.max_batch, wl.prompt_tokens, wl.output_tokens)
            predicted = {"latency_s": round(cost.request_latency_s(wl.prompt_tokens, wl.output_tokens), 6),
                         "throughput_rps": round(wl.max_batch / batch_s, 6)}
            replicas.append(replace(replica, predicted=predicted))
        return replace(plan, replicas=tuple(replicas))

    def select_plan(self, plan: DeploymentPlan) -> tuple[Score, DeploymentPlan]:
        """A given plan's best fastest-first subset of replicas, and its score."""
        costs = [replica_cost(self.cluster, self.model, placements_of(r, self.cluster), self.cfg)
                 for r in plan.replicas]
        chosen = self.select_replicas(costs)
        kept = DeploymentPlan(plan.model, tuple(plan.replicas[i] for i in chosen.order), dict(plan.meta))
        return chosen.score, kept
