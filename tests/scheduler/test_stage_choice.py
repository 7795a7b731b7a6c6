"""Small groups laid out for throughput: every stage mix listed, the bound that stops the listing, the plans."""

from __future__ import annotations

import itertools
import random
from unittest import mock

import numpy as np
import pytest

from hexgen.cluster import builtin_gpu_types, parse_cluster
from hexgen.costmodel import CostConfig, Workload, placements_of, replica_stage_costs
from hexgen.dispatch import make_policy
from hexgen.models import load_model_spec
from hexgen.planner.dp import PipelineLayout
from hexgen.planner.evaluate import PlanEvaluator
from hexgen.planner.objective import Objective
from hexgen.planner.partition import make_partition
from hexgen.planner.search import PlanRequest, plan_cluster
from hexgen.planner.stage_choice import degree_mixes, pipelines, split_pipelines
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests

WORKLOAD = Workload(128, 64, 64)
GPU_TYPES = sorted(builtin_gpu_types())


def two_machines(a: str, na: int, b: str, nb: int) -> str:
    return (f"machines:\n  - {{name: x, gpu: {a}, count: {na}, region: r}}\n"
            f"  - {{name: y, gpu: {b}, count: {nb}, region: r}}\n")


def evaluator_of(cluster_yaml: str, rate_rps: float = 2.0) -> PlanEvaluator:
    requests = generate_requests(WorkloadSpec(rate_rps, 300, TokenLengths.fixed(128), TokenLengths.fixed(64)),
                                 random.Random(5))
    return PlanEvaluator(parse_cluster(cluster_yaml), load_model_spec("llama-2-70b"), requests, Objective("tail"),
                         CostConfig(), WORKLOAD, "capacity-weighted")


def random_pairs(seed: int, count: int):
    """(evaluator, group) of `count` seeded random pairs of machines of 1, 2 or 4 GPUs of the built-in types."""
    rng = random.Random(seed)
    for _ in range(count):
        a, b = rng.choice(GPU_TYPES), rng.choice(GPU_TYPES)
        ev = evaluator_of(two_machines(a, rng.choice([1, 2, 4]), b, rng.choice([1, 2, 4])))
        yield ev, tuple(sorted((m.name, m.count) for m in ev.cluster.machines))


def test_stage_mixes_by_hand():
    assert degree_mixes([1, 2, 4], 4) == [(4,), (2,), (2, 2), (1,), (1, 1), (1, 1, 1), (1, 1, 1, 1)]
    assert degree_mixes([1, 2, 4], 3) == [(2,), (1,), (1, 1), (1, 1, 1)]
    assert degree_mixes([1], 1) == [(1,)]


def test_every_pipeline_of_two_machines_is_listed_once():
    ev = evaluator_of(two_machines("A100-80G", 4, "A40", 2))
    pricer = ev.solvers[WORKLOAD.max_batch].pricer
    listed = list(pipelines((("x", 4), ("y", 2)), pricer))
    assert len(listed) == len(set(listed))
    # by hand: x alone runs one of its 7 mixes (above), y alone one of 3 ((2,), (1,), (1, 1)), and both in either
    # order one of 7 x 3
    assert len(listed) == 7 + 3 + 2 * 7 * 3
    for stages in listed:
        machines = [m for m, _ in stages]
        assert machines == sorted(machines) or machines == sorted(machines, reverse=True)  # one run per machine
        for machine, gpus in (("x", 4), ("y", 2)):
            degrees = [d for m, d in stages if m == machine]
            assert sum(degrees) <= gpus and len(set(degrees)) <= 1


def test_a_pipeline_serves_at_most_its_batch_over_its_slowest_stage():
    # the early stop's bound, checked on every pipeline of random pairs of machines
    for ev, group in random_pairs(2, 12):
        for slowest_s, stages in split_pipelines(group, ev.solvers[WORKLOAD.max_batch].pricer):
            rps = ev.full_load_rps(PipelineLayout(stages, 0.0))
            assert rps <= WORKLOAD.max_batch / slowest_s * (1 + 1e-9)


def test_the_throughput_layout_is_the_best_listed_pipeline():
    # the early stop loses nothing: the layout serves what the best of every listed pipeline serves (and at least
    # what the full batch level's layout serves)
    for ev, group in random_pairs(4, 12):
        chosen = ev.layout(group, WORKLOAD.max_batch, True)
        full = ev.layout(group, WORKLOAD.max_batch)
        every = [ev.full_load_rps(PipelineLayout(stages, 0.0))
                 for _, stages in split_pipelines(group, ev.solvers[WORKLOAD.max_batch].pricer)]
        best = max(every + [ev.full_load_rps(full) if full is not None else 0.0])
        if best == 0.0:
            assert chosen == full  # nothing holds a full batch: the full batch level's layout (or None) stays
            continue
        assert ev.full_load_rps(chosen) == pytest.approx(best, rel=1e-12)
        assert ev.full_load_rps(chosen) >= (ev.full_load_rps(full) if full is not None else 0.0)


def test_the_layout_carries_the_dp_objective():
    # pricing.pipeline_s, which the listed layouts carry, gives the DP's own layouts the DP's objective
    for ev, group in random_pairs(6, 20):
        for level, solver in ev.solvers.items():
            dp = solver.best(group)
            if dp is None:
                continue
            got = solver.pricer.pipeline_s([(s.machine, s.tp_degree, s.num_layers) for s in dp.stages])
            assert got == pytest.approx(dp.latency_s, rel=1e-9), (group, level, dp)


def test_plans_score_at_least_as_well_and_the_written_plan_runs_the_scored_layouts():
    rng = random.Random(8)
    for _ in range(8):
        machines = [(rng.choice(GPU_TYPES), rng.choice([2, 4])) for _ in range(rng.choice([2, 3]))]
        text = "machines:\n" + "".join(f"  - {{name: m{i}, gpu: {g}, count: {n}, region: r}}\n"
                                       for i, (g, n) in enumerate(machines))
        ev = evaluator_of(text, rate_rps=rng.uniform(1.0, 8.0))
        for groups in ([{m.name: m.count for m in ev.cluster.machines}],
                       [{m.name: m.count} for m in ev.cluster.machines]):
            partition = make_partition(groups)
            with_choice = ev.select(partition)
            without = max((ev.select_replicas([ev.replica_cost(g, r) for g in partition]).score
                           for r in ev.levels), default=None)
            assert with_choice.score >= without
            plan = ev.to_plan(partition)
            for replica, layout in zip(plan.replicas, ev.layouts(partition), strict=True):
                assert [(s.machine, s.tp, s.layers[1] - s.layers[0]) for s in replica.stages] == [
                    (s.machine, s.tp_degree, s.num_layers) for s in layout.stages]


def test_a_pipeline_for_throughput_serves_the_stream_better_in_the_event_simulator():
    # 2 x L40S and 4 x A40 at 5.32 req/s: the DP's layouts leave one replica, the A40s at TP 4 (5.9 req/s at full
    # load): the fastest for one request, the L40S stage would add to a request's time. For throughput, the L40S at
    # TP 2 takes half the layers in front of the A40s (6.2 req/s). The search's p99 falls, and so does the event
    # simulator's, which runs the engine's scheduler step by step (12.8 -> 10.7 s when this was written)
    cluster = parse_cluster(two_machines("L40S", 2, "A40", 4))
    model = load_model_spec("llama-2-70b")
    request = PlanRequest(5.32, 100.0, WORKLOAD, 500, "capacity-weighted", 0, objective="tail")
    plan = plan_cluster(cluster, model, request).plan
    with mock.patch("hexgen.planner.stage_choice.MAX_MACHINES", 0):
        before = plan_cluster(cluster, model, request).plan
    assert [[(s.machine, s.tp) for s in r.stages] for r in before.replicas] == [[("y", 4)]]
    (replica,) = plan.replicas
    assert [(s.machine, s.tp) for s in replica.stages] == [("x", 2), ("y", 4)]
    assert plan.meta["stages_for_throughput"] is True and before.meta["stages_for_throughput"] is False
    assert plan.meta["predicted_tail_latency_s"] < before.meta["predicted_tail_latency_s"]
    assert replica.predicted["throughput_rps"] > 1.03 * before.replicas[0].predicted["throughput_rps"]
    spec = WorkloadSpec(5.32, 3000, TokenLengths.fixed(128), TokenLengths.fixed(64))
    simulated = []
    for p in (before, plan):
        costs = [replica_stage_costs(cluster, model, placements_of(r, cluster), CostConfig(), WORKLOAD)
                 for r in p.replicas]
        done = simulate([ReplicaModel(c, WORKLOAD.max_batch) for c in costs],
                        generate_requests(spec, random.Random(1)), make_policy("capacity-weighted"))
        simulated.append(np.percentile([c.latency_s for c in done], 99))
    assert simulated[1] < 0.9 * simulated[0]


def test_groups_past_the_limit_keep_the_full_batch_layout():
    ev = evaluator_of("machines:\n" + "".join(f"  - {{name: m{i}, gpu: A40, count: 2, region: r}}\n"
                                              for i in range(3)))
    group = (("m0", 2), ("m1", 2), ("m2", 2))
    assert ev.layout(group, WORKLOAD.max_batch, True) == ev.layout(group, WORKLOAD.max_batch)
    assert list(itertools.islice(pipelines(group, ev.solvers[64].pricer), 1))  # listable, but not listed


def test_alike_groups_share_one_solve_with_their_machines_renamed():
    # a1 and a2 are alike (same region, GPU type and count): the group (a2, b) gets (a1, b)'s layout with a1 named
    # a2, the layout a fresh evaluator finds for (a2, b) itself
    text = ("machines:\n  - {name: a1, gpu: L40S, count: 2, region: r}\n"
            "  - {name: a2, gpu: L40S, count: 2, region: r}\n  - {name: b, gpu: A40, count: 4, region: r}\n")
    ev, fresh = evaluator_of(text), evaluator_of(text)
    first = ev.layout((("a1", 2), ("b", 4)), WORKLOAD.max_batch, True)
    second = ev.layout((("a2", 2), ("b", 4)), WORKLOAD.max_batch, True)
    assert len(ev._throughput_solved) == 1
    assert [s.machine for s in first.stages] == ["a1", "b"]  # the L40S in front (the pipeline of the test above)
    assert second == fresh.layout((("a2", 2), ("b", 4)), WORKLOAD.max_batch, True)
    assert [(s.tp_degree, s.num_layers) for s in second.stages] == [(s.tp_degree, s.num_layers) for s in first.stages]
    assert [s.machine for s in second.stages] == ["a2", "b"]
