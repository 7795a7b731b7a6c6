"""The pipeline DP equals brute-force enumeration of every pipeline on small groups."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from scheduler_helpers import tiny_model

from hexgen.cluster import Cluster, GpuType, Link, Machine, Network
from hexgen.costmodel import CostConfig, StagePlacement, Workload, replica_cost, stage_memory_bytes
from hexgen.planner.dp import PipelineSolver, min_plus
from hexgen.planner.pricing import StagePricer
from hexgen.planner.segments import SegmentTable


def _stage_lists(count: int, degrees: list[int]):
    """Every ordered list of TP degrees using at most `count` GPUs."""
    for k in range(1, count + 1):
        for combo in itertools.product(degrees, repeat=k):
            if sum(combo) <= count:
                yield combo


def _compositions(total: int, parts: int):
    for cut in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cut, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force(cluster: Cluster, model, workload: Workload, cfg: CostConfig, group) -> float:
    """Least request latency over every machine order, stage list per machine and layer split that fits."""
    best = math.inf
    names = [m for m, _ in group]
    counts = dict(group)
    for r in range(1, len(names) + 1):
        for order in itertools.permutations(names, r):
            per_machine = [list(_stage_lists(counts[m], model.valid_tp_degrees(counts[m]))) for m in order]
            for choice in itertools.product(*per_machine):
                stages = [(m, t) for m, tps in zip(order, choice, strict=True) for t in tps]
                if len(stages) > model.num_layers:
                    continue
                for split in _compositions(model.num_layers, len(stages)):
                    best = min(best, _latency_if_fits(cluster, model, workload, cfg, stages, split))
    return best


def _latency_if_fits(cluster, model, workload, cfg, stages, split) -> float:
    last = len(stages) - 1
    for j, ((m, t), n) in enumerate(zip(stages, split, strict=True)):
        mem = stage_memory_bytes(model, t, n, workload, cfg, is_first=j == 0, is_last=j == last)
        if mem > cluster.machine(m).gpu.memory_bytes:
            return math.inf
    placements = [
        StagePlacement(m, cluster.machine(m).gpu, t, n, cluster.link(m, m))
        for (m, t), n in zip(stages, split, strict=True)
    ]
    cost = replica_cost(cluster, model, placements, cfg)
    return cost.request_latency_s(workload.prompt_tokens, workload.output_tokens)


def _random_cluster(rng: random.Random) -> Cluster:
    machines = []
    for i in range(rng.randint(1, 3)):
        gpu = GpuType(f"g{i}", rng.choice([0.12, 0.2, 0.3]), rng.uniform(200, 1500), rng.uniform(50, 300))
        machines.append(Machine(f"m{i}", gpu, rng.randint(1, 4), rng.choice(["r0", "r1"])))
    net = Network(Link(200.0, 0.01), Link(rng.uniform(1, 20), rng.uniform(0.1, 2)), Link(1.0, rng.uniform(5, 40)))
    return Cluster(tuple(machines), net)


def _check_against_brute_force(cluster: Cluster, model, workload: Workload) -> None:
    """The DP's layout of the whole cluster as one group takes the least latency brute force finds, and its
    stages, priced again from scratch, take that latency (None when nothing fits)."""
    cfg = CostConfig(runtime_reserve_gb=0.02)
    group = tuple((m.name, m.count) for m in cluster.machines)
    layout = PipelineSolver(StagePricer(cluster, model, workload, cfg)).best(group)
    expected = brute_force(cluster, model, workload, cfg, group)
    if math.isinf(expected):
        assert layout is None
        return
    assert layout is not None and layout.latency_s == pytest.approx(expected, rel=1e-9)
    stages = [(s.machine, s.tp_degree) for s in layout.stages]
    split = [s.num_layers for s in layout.stages]
    assert _latency_if_fits(cluster, model, workload, cfg, stages, split) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_dp_equals_brute_force_on_random_small_groups(seed):
    rng = random.Random(seed)
    cluster = _random_cluster(rng)
    model = tiny_model(num_layers=rng.randint(4, 6), hidden=2048, heads=4, kv_heads=2, vocab=1000)
    _check_against_brute_force(cluster, model, Workload(prompt_tokens=rng.randint(8, 256),
                                                         output_tokens=rng.randint(2, 64)))


def test_min_plus_matches_definition():
    a, b = [0.0, 2.0, 5.0, math.inf], [math.inf, 1.0, 1.5, 7.0]

    c, arg = min_plus(np.array(a), np.array(b))
    for j in range(4):
        assert c[j] == min(a[i] + b[j - i] for i in range(j + 1))
        assert a[arg[j]] + b[j - arg[j]] == c[j]


def _segment_brute_force(pricer: StagePricer, machine: str, count: int, first: bool, last: bool) -> list[float]:
    """Per layer count, the least time over every ordered list of TP degrees that fits `count` GPUs and every split
    of the layers, priced stage by stage from the pricer's figures (the definition SegmentTable optimises)."""
    top = pricer.model.num_layers
    best = [math.inf] * (top + 1)
    hop = pricer.hop_s(machine, machine)
    for degrees in _stage_lists(count, pricer.tp_degrees(machine)):
        k = len(degrees)
        roles = [(first and i == 0, last and i == k - 1) for i in range(k)]
        for layers in range(k, top + 1):
            for split in _compositions(layers, k):
                if any(n > pricer.max_layers(machine, d, *r) for d, n, r in zip(degrees, split, roles, strict=True)):
                    continue
                t = sum(pricer.stage_extra_s(machine, d, *r) + pricer.per_layer_s(machine, d) * n
                        for d, n, r in zip(degrees, split, roles, strict=True))
                t += (k - 1) * hop + (pricer.token_return_s(machine, machine) if first and last and k > 1 else 0)
                best[layers] = min(best[layers], t)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_segment_table_equals_brute_force(seed):
    """Every layer count, every first / last role, machines of up to 6 GPUs whose model allows TP 1, 2, 4 (or 1, 3):
    the knapsack's time equals the best of every stage list and split, and its stages give that time."""
    rng = random.Random(seed)
    heads = rng.choice([4, 12])  # TP degrees 1, 2, 4 or 1, 2, 3, 4, 6
    model = tiny_model(num_layers=rng.randint(3, 6), hidden=96 * heads, heads=heads, kv_heads=heads, vocab=1000)
    gpu = GpuType("g", rng.choice([0.05, 0.1, 0.3]), rng.uniform(200, 1500), rng.uniform(50, 300))
    count = rng.randint(1, 6)
    cluster = Cluster((Machine("m", gpu, count, "r"),), Network(Link(rng.uniform(20, 400), rng.uniform(0.005, 0.5)),
                                                                Link(10, 1), Link(1, 30)))
    workload = Workload(prompt_tokens=rng.randint(8, 256), output_tokens=rng.randint(2, 64),
                        max_batch=rng.choice([1, 8]))
    pricer = StagePricer(cluster, model, workload, CostConfig(runtime_reserve_gb=0.02))
    for first, last in itertools.product([False, True], repeat=2):
        table = SegmentTable(pricer, "m", count, first, last)
        expected = _segment_brute_force(pricer, "m", count, first, last)
        assert table.costs_s == pytest.approx(expected, rel=1e-9)
        for layers in np.nonzero(np.isfinite(table.costs_s))[0]:
            stages = table.stages(int(layers))
            assert sum(s.num_layers for s in stages) == layers and sum(s.tp_degree for s in stages) <= count
            assert [s.is_first for s in stages] == [first and i == 0 for i in range(len(stages))]
            assert [s.is_last for s in stages] == [last and i == len(stages) - 1 for i in range(len(stages))]
            roles = [(s.is_first, s.is_last) for s in stages]
            t = sum(pricer.stage_extra_s("m", s.tp_degree, *r) + pricer.per_layer_s("m", s.tp_degree) * s.num_layers
                    for s, r in zip(stages, roles, strict=True))
            t += (len(stages) - 1) * pricer.hop_s("m", "m")
            t += pricer.token_return_s("m", "m") if first and last and len(stages) > 1 else 0
            assert all(s.num_layers <= pricer.max_layers("m", s.tp_degree, *r) for s, r in zip(stages, roles,
                                                                                                 strict=True))
            assert t == pytest.approx(table.costs_s[layers], rel=1e-9)


def test_machines_of_many_gpus_are_planned():
    """64 and 128 GPUs of TP 1, 2, 4, 8 (17,360 and over 10^6 sets of TP groups, once refused) and 3,000 CPU slots of
    TP 1: planned; more GPUs never make the best pipeline slower (the table is over at most that many GPUs)."""
    model = tiny_model(num_layers=40, hidden=256, heads=8, kv_heads=8, vocab=1000)  # ~1.5 MB of weights a layer
    workload, cfg = Workload(prompt_tokens=64, output_tokens=16), CostConfig(runtime_reserve_gb=0.02)

    def solve(count: int, memory_gb: float = 0.04):
        gpu = GpuType("g", memory_gb, 2000.0, 300.0)
        cluster = Cluster((Machine("big", gpu, count, "r"),), Network(Link(200.0, 0.01), Link(10, 1), Link(1, 30)))
        return PipelineSolver(StagePricer(cluster, model, workload, cfg)).best((("big", count),))

    layouts = {count: solve(count) for count in (8, 32, 64, 128)}
    assert all(layout is not None for layout in layouts.values())
    assert [layouts[c].latency_s for c in (8, 32, 64, 128)] == sorted(
        (layouts[c].latency_s for c in (8, 32, 64, 128)), reverse=True)
    for count, layout in layouts.items():
        assert sum(s.tp_degree for s in layout.stages) <= count
        assert sum(s.num_layers for s in layout.stages) == model.num_layers
    slots = solve(3000, memory_gb=0.025)
    assert slots is not None and sum(s.num_layers for s in slots.stages) == model.num_layers


def _cluster_of_kinds(rng: random.Random, num_machines: int, override: bool) -> Cluster:
    """Machines drawn from three kinds (a GPU type, count and region each; two differ in region only), so several
    are interchangeable; with `override`, a link naming one machine makes it unlike its kind."""
    ga = GpuType("ga", 0.3, rng.uniform(200, 1500), rng.uniform(50, 300))
    count_a = rng.randint(1, 2)
    kinds = [(ga, count_a, "r0"), (ga, count_a, "r1"),
             (GpuType("gb", 0.2, rng.uniform(200, 1500), rng.uniform(50, 300)), 1, rng.choice(["r0", "r1"]))]
    machines = tuple(Machine(f"m{i}", *rng.choice(kinds)) for i in range(num_machines))
    links = ((frozenset({"m0", "m1"}), Link(rng.uniform(0.01, 0.1), rng.uniform(20, 80))),) if override else ()
    net = Network(Link(200.0, 0.01), Link(rng.uniform(1, 20), rng.uniform(0.1, 2)), Link(1.0, rng.uniform(5, 40)),
                  links)
    return Cluster(machines, net)


@pytest.mark.parametrize("seed", range(16))
def test_dp_over_interchangeable_machines_equals_brute_force(seed):
    """The DP expands only a class's first unused machine; brute force tries every machine order and subset."""
    rng = random.Random(1000 + seed)
    cluster = _cluster_of_kinds(rng, rng.randint(2, 4), override=seed % 4 == 0)
    model = tiny_model(num_layers=rng.randint(3, 5), hidden=2048, heads=4, kv_heads=2, vocab=1000)
    _check_against_brute_force(cluster, model, Workload(prompt_tokens=rng.randint(8, 256),
                                                         output_tokens=rng.randint(2, 64)))


def test_dp_of_many_machines_chooses_among_class_ordered_subsequences():
    """Past MAX_EXACT_MACHINES the DP keeps the machines in (region, name) order and picks which to use (skipping
    a class's machines that a later one of the class could stand in for): against brute force over every
    subsequence of that order (names shuffled so that the kinds interleave)."""
    rng = random.Random(7)
    fast, slow = GpuType("fast", 0.3, 1400.0, 250.0), GpuType("slow", 0.3, 300.0, 60.0)
    names = [f"n{i}" for i in rng.sample(range(10), 9)]
    machines = tuple(Machine(n, fast if i % 2 else slow, 1, "r0") for i, n in enumerate(names))
    cluster = Cluster(machines, Network(Link(200.0, 0.01), Link(5.0, 0.3), Link(1.0, 30.0)))
    model = tiny_model(num_layers=6, hidden=2048, heads=4, kv_heads=2, vocab=1000)
    workload, cfg = Workload(prompt_tokens=64, output_tokens=16), CostConfig(runtime_reserve_gb=0.02)
    ordered = sorted(machines, key=lambda m: (m.region, m.name))
    expected = math.inf
    for r in range(1, model.num_layers + 1):
        for subset in itertools.combinations(ordered, r):
            for split in _compositions(model.num_layers, r):
                stages = [(m.name, 1) for m in subset]
                expected = min(expected, _latency_if_fits(cluster, model, workload, cfg, stages, split))
    group = tuple(sorted((m.name, 1) for m in machines))
    layout = PipelineSolver(StagePricer(cluster, model, workload, cfg)).best(group)
    assert layout is not None and layout.latency_s == pytest.approx(expected, rel=1e-9)


def test_a_group_like_a_solved_one_gets_its_layout_renamed():
    """Groups equal up to swapping interchangeable machines are solved once; the second gets the first's layout on
    its own machines, the same a fresh solver finds for it."""
    slow, fast = GpuType("slow", 0.3, 300.0, 60.0), GpuType("fast", 0.3, 1400.0, 250.0)
    machines = tuple(Machine(f"s{i}", slow, 1, "r0") for i in range(3)) + (Machine("f0", fast, 2, "r0"),)
    cluster = Cluster(machines, Network(Link(200.0, 0.01), Link(5.0, 0.3), Link(1.0, 30.0)))
    model = tiny_model(num_layers=6, hidden=2048, heads=4, kv_heads=2, vocab=1000)
    workload, cfg = Workload(prompt_tokens=64, output_tokens=16), CostConfig(runtime_reserve_gb=0.02)
    solver = PipelineSolver(StagePricer(cluster, model, workload, cfg))
    first = solver.best((("f0", 2), ("s0", 1), ("s1", 1)))
    second = solver.best((("f0", 2), ("s1", 1), ("s2", 1)))
    fresh = PipelineSolver(StagePricer(cluster, model, workload, cfg)).best((("f0", 2), ("s1", 1), ("s2", 1)))
    assert len(solver._solved) == 1
    assert second == fresh and second.latency_s == first.latency_s
    assert {s.machine for s in second.stages} <= {"f0", "s1", "s2"}
    assert [s.machine for s in second.stages] == [{"s0": "s1", "s1": "s2"}.get(s.machine, s.machine)
                                                  for s in first.stages]


def test_layers_of_alike_stages_are_split_by_what_each_holds():
    """Two alike machines: every split of the layers between them takes the same time, so the DP alone would leave
    the split to float rounding. The layout shares them in proportion to each stage's layer capacity, which
    leaves the most KV memory on the tighter stage."""
    gpu = GpuType("g", 0.3, 900.0, 100.0)
    cluster = Cluster(tuple(Machine(f"m{i}", gpu, 1, "r") for i in range(2)),
                      Network(Link(200.0, 0.01), Link(10.0, 0.5), Link(1.0, 30.0)))
    model = tiny_model(num_layers=40, hidden=512, heads=8, kv_heads=8, vocab=32000)
    workload, cfg = Workload(prompt_tokens=64, output_tokens=16, max_batch=8), CostConfig(runtime_reserve_gb=0.02)
    pricer = StagePricer(cluster, model, workload, cfg)
    layout = PipelineSolver(pricer).best((("m0", 1), ("m1", 1)))
    assert layout is not None and [s.machine for s in layout.stages] == ["m0", "m1"]
    caps = [pricer.max_layers("m0", 1, True, False), pricer.max_layers("m1", 1, False, True)]
    assert caps[0] + caps[1] > 40  # room to choose
    first = layout.stages[0].num_layers
    assert abs(first - 40 * caps[0] / sum(caps)) < 1 and first + layout.stages[1].num_layers == 40
