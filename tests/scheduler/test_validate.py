"""Hand-written invalid plans get an error naming the replica, stage and rule."""

from __future__ import annotations

import pytest

from hexgen.costmodel import CostConfig, Workload
from hexgen.errors import PlanError
from hexgen.models import load_model_spec
from hexgen.plan import plan_from_dict
from hexgen.planner.validate import validate_plan

MODEL = load_model_spec("llama-2-70b")


def _check(cluster, stages):
    plan = plan_from_dict({"model": "llama-2-70b", "replicas": [{"stages": stages}]})
    return validate_plan(plan, MODEL, cluster, Workload(), CostConfig())


def test_valid_plan_reports_memory(tiny_cluster):
    mem = _check(tiny_cluster, [{"machine": "big-0", "gpus": [0, 1, 2, 3], "tp": 4, "layers": [0, 80]}])
    assert mem[0].used_bytes < mem[0].capacity_bytes


@pytest.mark.parametrize("stages, pattern", [
    ([{"machine": "small-0", "gpus": [0, 1], "tp": 2, "layers": [0, 80]}],
     r"replica 0 stage 0: needs .* GiB per GPU but small-0's A4000 has 16.0 GiB \(rule: memory fits"),
    ([{"machine": "big-0", "gpus": [0, 1, 2, 3], "tp": 4, "layers": [0, 60]},
      {"machine": "mars", "gpus": [0, 1], "tp": 2, "layers": [60, 80]}],
     r"replica 0 stage 1: machine 'mars' is not in the cluster"),
    ([{"machine": "big-0", "gpus": [0, 1, 2, 3], "tp": 4, "layers": [0, 70]},
      {"machine": "mid-0", "gpus": [2, 3], "tp": 2, "layers": [70, 80]}],
     r"replica 0 stage 1: GPU 2 does not exist on mid-0, which has GPUs 0-1 \(rule: a TP group lies on one machine"),
    ([{"machine": "big-0", "gpus": [0, 1, 2, 3], "tp": 4, "layers": [0, 70]}],
     r"replica 0: stages cover layers \[0, 70\) but llama-2-70b has 80"),
    ([{"machine": "big-0", "gpus": [0, 1, 2], "tp": 3, "layers": [0, 80]}],
     r"replica 0 stage 0: tp 3 does not divide"),
    ([{"machine": "big-0", "gpus": [0, 1], "tp": 2, "layers": [0, 40]},
      {"machine": "big-0", "gpus": [1, 2], "tp": 2, "layers": [40, 80]}],
     r"replica 0 stage 1: GPU 1 of machine 'big-0' is already used by replica 0 stage 0"),
])
def test_invalid_plans_name_stage_and_rule(tiny_cluster, stages, pattern):
    with pytest.raises(PlanError, match=pattern):
        _check(tiny_cluster, stages)


def test_batch_limit_above_the_kv_pool_is_refused(tiny_cluster):
    # llama-2-70b at TP 4 on big-0 (4 x A6000, 48 GiB): about 33 GiB of weights and embeddings per GPU leave ~14 GiB,
    # i.e. thousands of 16-token blocks of 80 layers x 2 x 2 KV heads x 128 x 2 bytes = 80 KiB per token per rank,
    # far fewer than a batch limit of a million sequences
    plan = plan_from_dict({"model": "llama-2-70b", "replicas": [{"stages": [
        {"machine": "big-0", "gpus": [0, 1, 2, 3], "tp": 4, "layers": [0, 80]}]}]})
    validate_plan(plan, MODEL, tiny_cluster, Workload(128, 64, 64), CostConfig())
    with pytest.raises(PlanError, match=r"replica 0: its KV pool holds \d+ blocks of 16 tokens .* limit 1000000"):
        validate_plan(plan, MODEL, tiny_cluster, Workload(128, 64, 1_000_000), CostConfig())
