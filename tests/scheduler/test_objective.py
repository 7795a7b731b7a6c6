"""The search's objective, its closed-form queues and replica selection, against hand values and the simulator."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hexgen.costmodel import CostConfig, LinearCost, ReplicaCost, Workload
from hexgen.dispatch import RoundRobin
from hexgen.models import load_model_spec
from hexgen.planner.genetic import GAConfig
from hexgen.planner.objective import Objective
from hexgen.planner.search import PlanRequest, best_symmetric_plan, initial_partitions, make_evaluator, plan_cluster
from hexgen.sim.closed_form import RoundRobinQueues
from hexgen.sim.metrics import tail_latency_s
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests


def test_objectives_by_hand():
    lat = np.arange(1.0, 101.0)  # 1 .. 100 s
    # 99% of 100 requests: the 99th smallest latency, 99 s; mean 50.5 s; 60 of them within 60 s
    assert tail_latency_s(lat, 0.99) == 99.0 and tail_latency_s(lat, 0.5) == 50.0
    assert Objective("attainment", slo_s=60.0).score(lat) == (0.6, -99.0, -50.5)
    assert Objective("tail").score(lat) == (-99.0, -50.5)


def test_tail_objective_prefers_the_tighter_tail_where_attainment_ties():
    steady = np.full(100, 4.0)  # mean 4, p99 4
    spiky = np.array([1.0] * 98 + [9.0, 9.0])  # mean 1.16, but p99 9
    loose = Objective("attainment", slo_s=10.0)
    assert loose.score(steady)[0] == loose.score(spiky)[0] == 1.0
    assert loose.score(steady) > loose.score(spiky) and Objective("tail").score(steady) > Objective("tail").score(spiky)


def test_full_batch_time_by_hand():
    cost = LinearCost(0.5, 0.01, 0.2, 0.03, 0.001)
    # 2 requests of prompt 10, 3 outputs: prefill of 20 tokens, then 2 decode steps over 2 x 11 and 2 x 12 tokens
    expected = (0.5 + 0.01 * 20) + (0.2 + 2 * 0.03 + 0.001 * 22) + (0.2 + 2 * 0.03 + 0.001 * 24)
    assert cost.batch_time_s(2, 10, 3) == pytest.approx(expected)
    assert cost.batch_time_s(1, 10, 3) == cost.request_latency_s(10, 3)


def test_closed_form_round_robin_equals_the_event_simulator():
    costs = [LinearCost(0.3, 0.002, 0.05, 0.01, 1e-4), LinearCost(0.6, 0.004, 0.09, 0.01, 2e-4),
             LinearCost(0.2, 0.001, 0.04, 0.01, 1e-4)]
    spec = WorkloadSpec(4.0, 400, TokenLengths(10, 200), TokenLengths(1, 40))
    requests = generate_requests(spec, random.Random(3))
    done = simulate([ReplicaModel(ReplicaCost.one_stage(c)) for c in costs], requests, RoundRobin())
    by_id = {c.request.request_id: c.latency_s for c in done}
    expected = [by_id[r.request_id] for r in sorted(requests, key=lambda r: (r.arrival_s, r.request_id))]
    assert RoundRobinQueues(requests).latencies_s(costs) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_selection_keeps_only_fast_replicas_at_light_load(tiny_cluster):
    model = load_model_spec("llama-2-13b")
    request = PlanRequest(0.05, 30.0, Workload(128, 32), num_requests=200, objective="tail")
    ev = make_evaluator(tiny_cluster, model, request, CostConfig())
    fast, slow = LinearCost(decode_fixed_s=0.01), LinearCost(decode_fixed_s=1.0)
    chosen = ev.select_replicas([ReplicaCost.one_stage(slow), None, ReplicaCost.one_stage(fast)])
    assert chosen.order == (2,)  # one fast replica alone: requests 20 s apart never queue


@pytest.mark.parametrize("objective,rate", [("tail", 0.2), ("tail", 2.0), ("attainment", 1.0)])
def test_asymmetric_scores_at_least_the_best_symmetric_plan(tiny_cluster, objective, rate):
    model = load_model_spec("llama-2-13b")
    request = PlanRequest(rate, 8.0, Workload(128, 32), num_requests=300, objective=objective,
                          ga=GAConfig(generations=8, patience=4))
    result = plan_cluster(tiny_cluster, model, request)
    _, symmetric_score = best_symmetric_plan(tiny_cluster, model, request)
    assert result.search.best_score >= symmetric_score
    # by construction: every symmetric grouping, re-laid out by the DP, is already in the first population
    ev = make_evaluator(tiny_cluster, model, request, CostConfig())
    first = max(ev.score(p) for p in initial_partitions(tiny_cluster, model, request.workload, ev.cfg))
    assert first >= symmetric_score
