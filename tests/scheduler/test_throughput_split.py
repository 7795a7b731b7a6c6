"""A batching pipeline's layers re-split so that its slowest stage is as fast as memory allows."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from hexgen.cluster import parse_cluster
from hexgen.costmodel import CostConfig, Workload
from hexgen.models import load_model_spec
from hexgen.planner.evaluate import PlanEvaluator
from hexgen.planner.objective import Objective
from hexgen.planner.partition import make_partition
from hexgen.planner.throughput_split import StageRate, min_max_split
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests


def splits(num_layers: int, stages: int):
    """Every way of giving each of `stages` stages at least one of `num_layers` layers, in order."""
    for cut in itertools.combinations(range(1, num_layers), stages - 1):
        yield [b - a for a, b in zip((0, *cut), (*cut, num_layers), strict=True)]


def largest_s(rates: list[StageRate], split: list[int]) -> float:
    return max(r.time_s(n) for r, n in zip(rates, split, strict=True))


def test_two_stages_by_hand():
    # 8 layers on a stage of 1 s a layer and one of 3 s: 6 + 2 gives 6 s on each, where 4 + 4 would give 12 s
    assert min_max_split([StageRate(1.0, 0.0, 8), StageRate(3.0, 0.0, 8)], 8) == [6, 2]
    # the first stage holds at most 4 layers: the rest go to the slow one (4 s against 12 s)
    assert min_max_split([StageRate(1.0, 0.0, 4), StageRate(3.0, 0.0, 8)], 8) == [4, 4]
    # a fixed 4 s on the fast stage (say the LM head) moves a layer to the slow one: 4 + 5 = 9 and 3 x 3 = 9, where
    # 6 + 2 would give 4 + 6 = 10
    assert min_max_split([StageRate(1.0, 4.0, 8), StageRate(3.0, 0.0, 8)], 8) == [5, 3]


def test_no_split_where_the_caps_cannot_hold_the_layers():
    assert min_max_split([StageRate(1.0, 0.0, 3), StageRate(1.0, 0.0, 4)], 8) is None
    assert min_max_split([StageRate(1.0, 0.0, 0), StageRate(1.0, 0.0, 9)], 8) is None  # a stage holds no layer
    assert min_max_split([StageRate(1.0, 0.0, 9)] * 3, 2) is None  # fewer layers than stages


def test_the_largest_stage_time_matches_brute_force():
    rng = random.Random(7)
    for _ in range(300):
        stages, num_layers = rng.randint(1, 4), rng.randint(4, 14)
        rates = [StageRate(rng.choice([0.5, 1.0, 1.5, 2.0, 3.0]) * rng.uniform(0.9, 1.1), rng.uniform(0.0, 4.0),
                           rng.randint(1, num_layers)) for _ in range(stages)]
        feasible = [s for s in splits(num_layers, stages)
                    if all(n <= r.max_layers for n, r in zip(s, rates, strict=True))] if num_layers >= stages else []
        got = min_max_split(rates, num_layers)
        if not feasible:
            assert got is None
            continue
        assert got is not None and sum(got) == num_layers
        assert all(1 <= n <= r.max_layers for n, r in zip(got, rates, strict=True))
        assert largest_s(rates, got) == pytest.approx(min(largest_s(rates, s) for s in feasible), rel=1e-12)


def one_layer_at_a_time(stages: list[StageRate], num_layers: int) -> list[int]:
    """The filling spelled out: one layer each, then every further layer to the stage whose time after it is least,
    the earlier stage on ties."""
    split = [1] * len(stages)
    for _ in range(num_layers - len(stages)):
        room = [i for i, s in enumerate(stages) if split[i] < s.max_layers]
        split[min(room, key=lambda i: (stages[i].time_s(split[i] + 1), i))] += 1
    return split


def test_the_split_is_the_one_layer_at_a_time_filling():
    # min_max_split places every layer below a water level at once; the layers it places must be the same, ties
    # (equal stages, equal times) and stages of free layers included
    rng = random.Random(11)
    for _ in range(2000):
        stages, num_layers = rng.randint(1, 6), rng.randint(6, 90)
        per_layer = [0.0, 0.25, 0.5, 1.0, 1.5, 3.0] if rng.random() < 0.2 else [0.25, 0.5, 1.0, 1.5, 3.0]
        rates = [StageRate(rng.choice(per_layer) * (1 if rng.random() < 0.5 else rng.uniform(0.9, 1.1)),
                           rng.choice([0.0, 1.0, rng.uniform(0.0, 20.0)]), rng.randint(1, num_layers))
                 for _ in range(stages)]
        if num_layers < stages or sum(r.max_layers for r in rates) < num_layers:
            assert min_max_split(rates, num_layers) is None
            continue
        assert min_max_split(rates, num_layers) == one_layer_at_a_time(rates, num_layers)


# Two machines of one region whose GPUs differ in speed and memory: Llama-2-70B fits on neither alone, and the DP,
# which adds stage times up, splits 24 | 56, which leaves the A40 stage the slower one.
MIXED = """
machines:
  - {name: a5000, gpu: A5000, count: 2, region: r}
  - {name: a40, gpu: A40, count: 2, region: r}
"""
GROUP = (("a40", 2), ("a5000", 2))


@pytest.fixture(scope="module")
def evaluator() -> PlanEvaluator:
    cluster, model = parse_cluster(MIXED), load_model_spec("llama-2-70b")
    workload = Workload(128, 64, 64)
    requests = generate_requests(WorkloadSpec(2.0, 200, TokenLengths.fixed(128), TokenLengths.fixed(64)),
                                 random.Random(3))
    return PlanEvaluator(cluster, model, requests, Objective("tail"), CostConfig(), workload, "capacity-weighted")


def with_layers(layout, split):
    return replace(layout, stages=tuple(replace(s, num_layers=n) for s, n in zip(layout.stages, split, strict=True)))


def test_the_full_batch_layout_serves_what_the_best_split_of_its_stages_serves(evaluator):
    top = evaluator.workload.max_batch
    dp = evaluator.solvers[top].best(GROUP)
    assert dp is not None and len(dp.stages) == 2
    chosen = evaluator.layout(GROUP, top)
    assert [(s.machine, s.tp_degree) for s in chosen.stages] == [(s.machine, s.tp_degree) for s in dp.stages]
    best = max(evaluator.full_load_rps(with_layers(dp, s)) for s in splits(evaluator.model.num_layers, 2))
    assert evaluator.full_load_rps(dp) < 0.97 * best  # the DP's sum leaves throughput behind here
    assert evaluator.full_load_rps(chosen) >= 0.999 * best
    # the DP's objective of the new split: the old one plus each stage's layers moved times its time per layer
    pricer = evaluator.solvers[top].pricer
    moved = sum(pricer.per_layer_s(s.machine, s.tp_degree) * (c.num_layers - s.num_layers)
                for s, c in zip(dp.stages, chosen.stages, strict=True))
    assert chosen.latency_s == pytest.approx(dp.latency_s + moved)


def test_lighter_levels_keep_the_dp_split(evaluator):
    for level in evaluator.levels[:-1]:
        assert evaluator.layout(GROUP, level) == evaluator.solvers[evaluator.layout_level(GROUP, level)].best(GROUP)


def test_the_written_plan_runs_the_scored_layout(evaluator):
    partition = make_partition([dict(GROUP)])
    chosen = evaluator.select(partition)
    (layout,) = evaluator.layouts(partition)
    assert layout == evaluator.layout(GROUP, chosen.reserve, chosen.for_throughput)
    plan = evaluator.to_plan(partition)
    (replica,) = plan.replicas
    assert [s.layers[1] - s.layers[0] for s in replica.stages] == [s.num_layers for s in layout.stages]


def test_a_lighter_layout_that_runs_at_the_full_batch_is_re_split_too():
    # Short requests (8 + 32 tokens): the one-sequence level's layout of Llama-2-70B over an A6000 alone (TP 1) and
    # two more (TP 2) already holds the whole batch's KV, so it is the layout that runs at the full batch; its 22 | 58
    # split leaves the TP 2 stage the slower one
    cluster = parse_cluster("machines:\n  - {name: one, gpu: A6000, count: 1, region: r}\n"
                            "  - {name: two, gpu: A6000, count: 2, region: r}\n")
    evaluator = PlanEvaluator(cluster, load_model_spec("llama-2-70b"), [], Objective("tail"), CostConfig(),
                              Workload(8, 32, 64), "capacity-weighted")
    group, top = (("one", 1), ("two", 2)), 64
    level = evaluator.layout_level(group, top)
    assert level < top
    light = evaluator.solvers[level].best(group)
    assert evaluator.layout(group, level) == light  # at its own level it keeps the DP's split
    chosen = evaluator.layout(group, top)
    assert [(s.machine, s.tp_degree) for s in chosen.stages] == [(s.machine, s.tp_degree) for s in light.stages]
    assert chosen != light
    best = max(evaluator.full_load_rps(with_layers(light, s)) for s in splits(evaluator.model.num_layers, 2))
    assert evaluator.full_load_rps(light) < evaluator.full_load_rps(chosen)
    # within 3% of the best: the filling balances the DP's full-batch stage times, while the rate is of micro-batches
    # and a prompt holds a pipeline up less where its stages differ (here 28 | 52 against the best split's 26 | 54,
    # 1.9% more)
    assert evaluator.full_load_rps(chosen) >= 0.97 * best
    # the layout carries the lighter level's DP objective, moved by that level's per-layer times
    pricer = evaluator.solvers[level].pricer
    moved = sum(pricer.per_layer_s(s.machine, s.tp_degree) * (c.num_layers - s.num_layers)
                for s, c in zip(light.stages, chosen.stages, strict=True))
    assert chosen.latency_s == pytest.approx(light.latency_s + moved)
