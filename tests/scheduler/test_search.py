"""The genetic search: valid plans, reproducible, and a clear message when nothing fits."""

from __future__ import annotations

import pytest

from hexgen.cluster import load_cluster, parse_cluster
from hexgen.costmodel import CostConfig, Workload
from hexgen.errors import UserError
from hexgen.models import load_model_spec
from hexgen.planner.genetic import GAConfig
from hexgen.planner.search import PlanRequest, plan_cluster
from hexgen.planner.validate import validate_plan

SMALL = GAConfig(generations=12, patience=6)


def _plan(cluster, seed, rate=1.0):
    model = load_model_spec("llama-2-13b")
    request = PlanRequest(rate, 30.0, Workload(128, 32), num_requests=150, seed=seed, ga=SMALL)
    return model, plan_cluster(cluster, model, request)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ga_plans_pass_the_validator(tiny_cluster, seed):
    model, result = _plan(tiny_cluster, seed)
    validate_plan(result.plan, model, tiny_cluster, Workload(128, 32), CostConfig())
    assert result.plan.replicas and result.search.evaluations > 1


def test_same_seed_same_plan(tiny_cluster):
    assert _plan(tiny_cluster, 5)[1].plan == _plan(tiny_cluster, 5)[1].plan


def test_planning_58_gpus_is_fast_and_valid():
    full = load_cluster("examples/clusters/hetero-full.yaml")
    model = load_model_spec("llama-2-70b")
    request = PlanRequest(1.0, 15.0, Workload(), num_requests=200, ga=GAConfig(generations=10, patience=5))
    result = plan_cluster(full, model, request)
    validate_plan(result.plan, model, full, Workload(), CostConfig())
    assert len(result.plan.replicas) >= 4 and result.elapsed_s < 30


def test_cluster_too_small_says_how_much_is_missing():
    small = parse_cluster("machines: [{name: a, gpu: A4000, count: 2}]")
    with pytest.raises(UserError, match=r"cannot hold even one replica of llama-2-70b.*\d+\.\d GiB missing"):
        plan_cluster(small, load_model_spec("llama-2-70b"), PlanRequest(1.0, 10.0, ga=SMALL))
