"""Score a partition (or any set of replicas): DP layout per group, then the best fastest-first subset.

Replicas are put in rotation order fastest first, and the k fastest are used for the k that scores best (the
others stay idle): at light load a few fast replicas beat many slow ones. For one-request-at-a-time replicas
under round-robin the latencies come in closed form (sim/closed_form.py) and the score is monotone: replacing
replicas by faster ones, or offering extra ones, never lowers it. A symmetric plan's grouping, re-laid out by
the DP, therefore scores at least as well as the symmetric plan itself.

Batching replicas (max_batch > 1) are scored by the analytic load model (sim/analytic.py). Each group is laid
out by the DP once per KV reservation level (room for 1, a few, or max_batch sequences of the workload's
length per replica): a layout with more room for KV batches more, one with less is faster alone. Every
partition is scored at each level and keeps the best, so replica count, layout and batch size are weighed
against each other through KV memory. At the full batch level a pipeline's layers are then re-split for
throughput where that serves more (throughput_split.py): the DP adds stage times up, a batching pipeline runs at
the pace of its slowest stage. Every partition is also scored once more with each small group laid out for
throughput (stage_choice.py: its stages too, not only their layers, chosen for the most requests/s at full load),
and that choice is kept where it scores better: a faster replica at full load need not serve the stream better.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from hexgen.cluster import Cluster
from hexgen.costmodel import CostConfig, ReplicaCost, StagePlacement, Workload, placements_of, replica_stage_costs
from hexgen.dispatch import make_policy
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan
from hexgen.planner import stage_choice
from hexgen.planner.build import build_plan
from hexgen.planner.dp import LayoutStage, PipelineLayout, PipelineSolver
from hexgen.planner.genetic import Score
from hexgen.planner.objective import Objective
from hexgen.planner.partition import Group, Partition
from hexgen.planner.pricing import StagePricer
from hexgen.planner.stage_choice import split_pipelines, stage_rates
from hexgen.planner.throughput_split import min_max_split
from hexgen.sim.analytic import BatchingLoad, dispatch_shares, plan_latencies_s
from hexgen.sim.closed_form import RoundRobinQueues
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import Request


@dataclass(frozen=True)
class Selection:
    """The replicas to run, fastest first, the KV reservation level they were laid out for, and their score."""

    score: Score
    order: tuple[int, ...]  # indices into the candidate replicas, in rotation order
    reserve: int = 1  # sequences of KV each replica's layout reserves room for
    for_throughput: bool = False  # laid out for full-load throughput (PlanEvaluator.layout)


PATIENCE_K = 3  # batching: stop adding slower replicas after this many that do not raise the score


def reserve_levels(max_batch: int) -> tuple[int, ...]:
    """KV reservation levels tried for batching replicas: one sequence, an eighth of the batch, the whole batch."""
    return tuple(sorted({1, max(1, max_batch // 8), max_batch}))


class PlanEvaluator:
    """Partition -> replicas (one DP layout per feasible group) -> best subset's score; memoised."""

    def __init__(self, cluster: Cluster, model: ModelSpec, requests: list[Request], objective: Objective,
                 cfg: CostConfig, workload: Workload, dispatch: str = "round-robin"):
        self.cluster, self.model, self.cfg, self.workload = cluster, model, cfg, workload
        self.objective, self.dispatch, self.requests = objective, dispatch, requests
        self.levels = reserve_levels(workload.max_batch) if self.is_batching else (1,)
        # (reservation level, laid out for throughput) of each way a partition is scored
        self.choices = [(r, False) for r in self.levels] + ([(workload.max_batch, True)] if self.is_batching else [])
        self.solvers = {r: PipelineSolver(StagePricer(cluster, model, replace(workload, max_batch=r), cfg))
                        for r in self.levels}
        self.solver = self.solvers[self.levels[0]]
        self._queues = RoundRobinQueues(requests) if not self.is_batching and dispatch == "round-robin" else None
        span_s = max((r.arrival_s for r in requests), default=0.0) or 1.0
        self._load = BatchingLoad(workload.max_batch, workload.prompt_tokens, workload.output_tokens,
                                  len(requests) / span_s, len(requests))
        self._replica_costs = cache(self._replica_cost)  # memoised by positional arguments: see replica_cost
        self._layouts = cache(self._layout)
        self._throughput_solved: dict[tuple, tuple[Group, PipelineLayout | None]] = {}  # by class signature
        self._layout_cost = cache(lambda layout: self._cost_of(layout.stages))  # replica_cost, full_load_rps
        self.select = cache(self._select_partition)

    @property
    def is_batching(self) -> bool:
        return self.workload.max_batch > 1

    def layout_level(self, group: Group, reserve: int) -> int:
        """The reservation level whose DP layout the group's replica at level `reserve` runs: a lighter level's
        layout that already holds `reserve` sequences is kept (it is faster alone); scoring and the written plan
        both take it through layout."""
        if reserve > 1:
            lighter = self.levels[self.levels.index(reserve) - 1]
            cost, wl = self.replica_cost(group, lighter), self.workload
            if cost is not None and cost.max_running(reserve, wl.prompt_tokens, wl.output_tokens) >= reserve:
                return self.layout_level(group, lighter)
        return reserve

    def replica_cost(self, group: Group, reserve: int = 1, for_throughput: bool = False) -> ReplicaCost | None:
        """The cost of the group's replica as `layout` lays it out (None: it holds no replica, or no full batch)."""
        return self._replica_costs(group, reserve, for_throughput)

    def layout(self, group: Group, reserve: int, for_throughput: bool = False) -> PipelineLayout | None:
        """See _layout (memoised)."""
        return self._layouts(group, reserve, for_throughput)

    def _replica_cost(self, group: Group, reserve: int, for_throughput: bool) -> ReplicaCost | None:
        layout = self.layout(group, reserve, for_throughput)
        if layout is None:
            return None
        cost = self._layout_cost(layout)
        if self.is_batching and (cost.kv_blocks or 0) < self.workload.max_batch:
            return None  # the engine needs a KV block per running sequence of the batch limit
        return cost

    def _cost_of(self, stages: tuple[LayoutStage, ...]) -> ReplicaCost:
        c = self.cluster
        placements = [StagePlacement(s.machine, c.machine(s.machine).gpu, s.tp_degree, s.num_layers,
                                     c.tp_link(s.machine)) for s in stages]
        return replica_stage_costs(c, self.model, placements, self.cfg, self.workload)

    def _layout(self, group: Group, reserve: int, for_throughput: bool) -> PipelineLayout | None:
        """The layout of the group's replica at reservation level `reserve` (scored by replica_cost and written by
        layouts): the DP's at layout_level's level, and at the full batch level a pipeline's layers re-split for
        throughput where that serves more. Lighter levels keep the DP's split: they are there to be fast alone.
        `for_throughput` (full batch level only): of the pipelines stage_choice.py lists for a group of at most
        MAX_MACHINES machines, the one that serves most at full load, where that is more than the full batch
        level's layout serves."""
        if for_throughput:
            return self._throughput_layout(group)
        level = self.layout_level(group, reserve)
        layout = self.solvers[level].best(group)
        if layout is None or len(layout.stages) < 2 or reserve != self.workload.max_batch:
            return layout
        # stage times of the full batch, and memory caps that leave every stage room for the whole batch's KV
        rates = stage_rates(self.solvers[reserve].pricer, tuple((s.machine, s.tp_degree) for s in layout.stages))
        split = min_max_split(rates, self.model.num_layers)
        if split is None or split == [s.num_layers for s in layout.stages]:
            return layout
        own = self.solvers[level].pricer  # whose DP objective the layout carries: only the layers' share moved
        resplit = PipelineLayout(
            tuple(replace(s, num_layers=n) for s, n in zip(layout.stages, split, strict=True)),
            layout.latency_s + sum(own.per_layer_s(s.machine, s.tp_degree) * (n - s.num_layers)
                                   for s, n in zip(layout.stages, split, strict=True)))
        return resplit if self.full_load_rps(resplit) > self.full_load_rps(layout) else layout

    def _throughput_layout(self, group: Group) -> PipelineLayout | None:
        """The for_throughput layout (see _layout), solved once per class signature of the group's machines, as
        the DP does: machines of one class price alike, so alike groups get the solved layout with their machines
        renamed (the paper's 58-GPU cluster at 48 req/s: 351 groups a search, 173 signatures)."""
        if len(group) > stage_choice.MAX_MACHINES:
            return self.layout(group, self.workload.max_batch)
        solver = self.solvers[self.workload.max_batch]
        ordered = tuple(solver.by_class(group))
        signature = tuple(solver.class_key(*mc) for mc in ordered)
        if signature not in self._throughput_solved:
            self._throughput_solved[signature] = (ordered, self._solve_for_throughput(ordered))
        solved, layout = self._throughput_solved[signature]
        if layout is None or solved == ordered:
            return layout
        return layout.renamed(tuple(m for m, _ in solved), tuple(m for m, _ in ordered))

    def _solve_for_throughput(self, group: Group) -> PipelineLayout | None:
        full = self.workload.max_batch
        best, pricer = self.layout(group, full), self.solvers[full].pricer
        best_rps, best_stages = self.full_load_rps(best) if best is not None else 0.0, None
        for slowest_s, stages in split_pipelines(group, pricer):
            if full / slowest_s * (1 + 1e-9) <= best_rps:  # it serves at most that: so do all after it
                break
            rps = self._full_load_rps(self._cost_of(stages))  # uncached: hundreds a group
            if rps > best_rps:
                best_rps, best_stages = rps, stages
        if best_stages is None:
            return best
        # the DP's objective of this layout, as the DP's own layouts carry it
        return PipelineLayout(best_stages, pricer.pipeline_s([(s.machine, s.tp_degree, s.num_layers)
                                                              for s in best_stages]))

    def full_load_rps(self, layout: PipelineLayout) -> float:
        """Requests/s of the layout's replica at full load (0 where its KV pool holds no batch)."""
        return self._full_load_rps(self._layout_cost(layout))

    def _full_load_rps(self, cost: ReplicaCost) -> float:
        wl = self.workload
        holds_one = cost.max_running(wl.max_batch, wl.prompt_tokens, wl.output_tokens) >= 1
        if (cost.kv_blocks or 0) < wl.max_batch or not holds_one:
            return 0.0
        return cost.full_load_rps(wl.max_batch, wl.prompt_tokens, wl.output_tokens)

    def score(self, partition: Partition) -> Score:
        return self.select(partition).score

    def _select_partition(self, partition: Partition) -> Selection:
        best = None
        for reserve, for_throughput in self.choices:
            chosen = replace(self.select_replicas([self.replica_cost(g, reserve, for_throughput) for g in partition]),
                             reserve=reserve, for_throughput=for_throughput)
            if best is None or chosen.score > best.score:
                best = chosen
        return best

    def select_replicas(self, costs: list[ReplicaCost | None]) -> Selection:
        """The best-scoring k fastest of the candidate replicas (None: a group that holds no replica)."""
        wl = self.workload
        ranked = sorted((c.request_latency_s(wl.prompt_tokens, wl.output_tokens), i)
                        for i, c in enumerate(costs) if c is not None)
        order = [i for _, i in ranked]
        score, k = self._best_prefix(tuple(costs[i] for i in order))
        return Selection(score, tuple(order[:k]))

    @cache  # noqa: B019 - one evaluator per search; partitions of interchangeable machines share replica costs
    def _best_prefix(self, ranked: tuple[ReplicaCost, ...]) -> tuple[Score, int]:
        """The best score of the k fastest replicas (ranked fastest first), and that k."""
        if not ranked:
            return self.objective.score(np.array([])), 0
        best: tuple[Score, int] | None = None
        worse = 0
        for k in self._sizes(list(ranked)):
            score = self.objective.score(self.latencies_s(list(ranked[:k])))
            if best is None or score > best[0]:
                best, worse = (score, k), 0
            elif self.is_batching and (worse := worse + 1) >= PATIENCE_K:
                break
        return best

    def _sizes(self, ranked: list[ReplicaCost]) -> range:
        """Every k at batch 1; batching replicas start from the fewest whose full-load capacity covers the rate."""
        if not self.is_batching:
            return range(1, len(ranked) + 1)
        wl = self.workload
        capacity = np.cumsum([c.full_load_rps(wl.max_batch, wl.prompt_tokens, wl.output_tokens) for c in ranked])
        stable = np.nonzero(capacity >= self._load.rate_rps)[0]
        return range(int(stable[0]) + 1 if len(stable) else 1, len(ranked) + 1)

    def latencies_s(self, costs: list[ReplicaCost]) -> np.ndarray:
        """Latencies of the request stream on these replicas (closed form at batch 1, the load model batching)."""
        if self._queues is not None:
            return self._queues.latencies_s([c.sequential for c in costs])
        if not self.is_batching:
            done = simulate([ReplicaModel(c) for c in costs], self.requests, make_policy(self.dispatch))
            return np.array([c.latency_s for c in done])
        return self._batching_latencies_s(tuple(costs))

    @cache  # noqa: B019 - one evaluator per search; the same replica sets recur across partitions
    def _batching_latencies_s(self, costs: tuple[ReplicaCost, ...]) -> np.ndarray:
        return plan_latencies_s(list(costs), dispatch_shares(list(costs), self.dispatch, self._load), self._load)

    def layouts(self, partition: Partition) -> list[PipelineLayout]:
        """The layouts (layout) of the selected replicas, in rotation order."""
        chosen = self.select(partition)
        return [self.layout(partition[i], chosen.reserve, chosen.for_throughput) for i in chosen.order]

    def selected_costs(self, partition: Partition) -> list[ReplicaCost]:
        """The costs of the selected replicas' layouts (layouts), in rotation order."""
        chosen = self.select(partition)
        return [self.replica_cost(partition[i], chosen.reserve, chosen.for_throughput) for i in chosen.order]

    def to_plan(self, partition: Partition, meta: dict | None = None) -> DeploymentPlan:
        return self.with_predictions(build_plan(self.model.name, self.layouts(partition), meta))

    def with_predictions(self, plan: DeploymentPlan) -> DeploymentPlan:
        return with_predictions(plan, self.cluster, self.model, self.workload, self.cfg)

    def select_plan(self, plan: DeploymentPlan) -> tuple[Score, DeploymentPlan]:
        """A given plan's best fastest-first subset of replicas, and its score."""
        costs = [replica_stage_costs(self.cluster, self.model, placements_of(r, self.cluster), self.cfg,
                                     self.workload) for r in plan.replicas]
        chosen = self.select_replicas(costs)
        kept = DeploymentPlan(plan.model, tuple(plan.replicas[i] for i in chosen.order), dict(plan.meta))
        return chosen.score, kept


def with_predictions(
    plan: DeploymentPlan, cluster: Cluster, model: ModelSpec, workload: Workload, cfg: CostConfig
) -> DeploymentPlan:
    """Each replica's predicted latency of one request alone, its batch (the batch limit, or fewer if its KV pool
    holds fewer sequences), KV pool and throughput at full load (requests/s; one at a time: 1 / latency); the
    server's capacity-weighted dispatch reads the throughput."""
    p, o = workload.prompt_tokens, workload.output_tokens
    replicas = []
    for replica in plan.replicas:
        cost = replica_stage_costs(cluster, model, placements_of(replica, cluster), cfg, workload)
        running = max(1, cost.max_running(workload.max_batch, p, o))
        alone_s = cost.request_latency_s(p, o)
        throughput = cost.capacity_rps(running, p, o) if workload.max_batch > 1 else 1 / alone_s
        predicted = {"latency_s": round(alone_s, 6), "max_batch": running, "kv_blocks": cost.kv_blocks or 0,
                     "throughput_rps": round(throughput, 6)}
        replicas.append(replace(replica, predicted=predicted))
    return replace(plan, replicas=tuple(replicas))
