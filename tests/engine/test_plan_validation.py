"""Layout and plan validation: each broken rule is a PlanError that names it."""

from __future__ import annotations

import json

import pytest

from hexgen.errors import PlanError
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan, Replica, Stage, load_plan, plan_from_dict, single_replica_plan

SPEC = ModelSpec(name="tiny", num_layers=6, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=4,
                 head_dim=8, vocab_size=256, max_context=128)


@pytest.mark.parametrize(("tp", "layers", "fragment"), [
    ([1, 1], [3, 2], "sum to tiny's 6 layers (they sum to 5)"),
    ([1, 1], [6, 0], "must be >= 1 each"),
    ([3], None, "tp 3 does not divide tiny's 8 attention heads and 4 key/value heads; valid TP degrees: [1, 2, 4]"),
    ([8, 1], [3, 3], "tp 8 does not divide"),  # divides the 8 heads but not the 4 key/value heads
    ([1, 1], [6], "--tp gives 2 stages but --layers gives 1"),
])
def test_single_replica_plan_rejects(tp, layers, fragment):
    with pytest.raises(PlanError) as err:
        single_replica_plan(SPEC, tp, layers)
    assert fragment in str(err.value)


def test_single_replica_plan_default_split_and_gpus():
    plan = single_replica_plan(SPEC, [4, 2, 1, 1], None)
    stages = plan.replicas[0].stages
    assert [s.layers for s in stages] == [(0, 2), (2, 4), (4, 5), (5, 6)]  # remainder to earlier stages
    assert [s.gpus for s in stages] == [(0, 1, 2, 3), (4, 5), (6,), (7,)]
    assert plan.replicas[0].world_size == 8


def plan_of(*stages: Stage) -> DeploymentPlan:
    return DeploymentPlan("tiny", (Replica(tuple(stages)),))


@pytest.mark.parametrize(("plan", "fragment"), [
    (plan_of(Stage("m", (0,), 1, (0, 3)), Stage("m", (0,), 1, (3, 6))), "replica 0 stage 1: GPU 0 of machine 'm' is "
                                                                         "already used by replica 0 stage 0"),
    (plan_of(Stage("m", (0,), 1, (0, 3)), Stage("m", (1,), 1, (4, 6))), "layers start at 4 but must start at 3"),
    (plan_of(Stage("m", (0,), 1, (0, 6)), Stage("m", (1,), 1, (6, 6))), "layer range [6, 6) is empty"),
    (plan_of(Stage("m", (0, 1), 1, (0, 6))), "tp is 1 but 2 GPUs are listed"),
    (plan_of(Stage("m", (0, 0), 2, (0, 6))), "repeats a GPU"),
    (plan_of(Stage("m", (0,), 1, (0, 5))), "cover layers [0, 5) but tiny has 6 layers"),
    (DeploymentPlan("tiny", ()), "plan has no replicas"),
])
def test_validate_structure_names_the_rule(plan, fragment):
    with pytest.raises(PlanError) as err:
        plan.validate_structure(SPEC)
    assert fragment in str(err.value)


def test_two_replicas_may_not_share_a_gpu_but_other_machines_may_reuse_indices():
    a = Replica((Stage("m", (0,), 1, (0, 6)),))
    DeploymentPlan("tiny", (a, Replica((Stage("n", (0,), 1, (0, 6)),)))).validate_structure(SPEC)
    with pytest.raises(PlanError, match="replica 1 stage 0: GPU 0 of machine 'm' is already used"):
        DeploymentPlan("tiny", (a, a)).validate_structure(SPEC)


def test_json_round_trip(tmp_path):
    plan = single_replica_plan(SPEC, [2, 1], [4, 2])
    path = tmp_path / "plan.json"
    plan.save(path)
    assert load_plan(path) == plan


@pytest.mark.parametrize(("data", "fragment"), [
    ({"replicas": []}, "a plan is an object with 'model' and 'replicas'"),
    ({"model": "m", "replicas": {}}, "replicas must be a list"),
    ({"model": "m", "replicas": [{"stages": [{"gpus": [0], "layers": [0, 6]}]}]}, "stages[0] lacks 'machine'"),
    ({"model": "m", "replicas": [{"stages": [{"machine": "x", "gpus": [0], "layers": [0]}]}]},
     "layers must be [first, last+1]"),
    # JSON reads 1e400 as infinity and NaN as a float: both crashed `hexgen serve --plan` with a traceback
    ({"model": "m", "replicas": [{"stages": [{"machine": "x", "gpus": [0], "tp": float("inf"), "layers": [0, 6]}]}]},
     "replicas[0].stages[0].tp must be an integer >= 1, got Infinity"),
    ({"model": "m", "replicas": [{"stages": [{"machine": "x", "gpus": [0], "layers": [0, float("nan")]}]}]},
     "replicas[0].stages[0].layers[1] must be an integer >= 0, got NaN"),
    # these were taken: true as TP 1, a negative GPU index, a layer index 2.5 as 2, null as the machine 'None'
    ({"model": "m", "replicas": [{"stages": [{"machine": "x", "gpus": [0], "tp": True, "layers": [0, 6]}]}]},
     "replicas[0].stages[0].tp must be an integer >= 1, got true"),
    ({"model": "m", "replicas": [{"stages": [{"machine": "x", "gpus": [-1], "layers": [0, 6]}]}]},
     "replicas[0].stages[0].gpus[0] must be an integer >= 0, got -1"),
    ({"model": "m", "replicas": [{"stages": [{"machine": "x", "gpus": [0], "layers": [0, 2.5]}]}]},
     "replicas[0].stages[0].layers[1] must be an integer >= 0, got 2.5"),
    ({"model": "m", "replicas": [{"stages": [{"machine": None, "gpus": [0], "layers": [0, 6]}]}]},
     "replicas[0].stages[0].machine must be a machine's name, got null"),
    ({"model": "m", "replicas": [{"stages": [{"machine": "x", "gpus": [0], "layers": [0, 6]}],
                                  "predicted": {"throughput_rps": -2}}]},
     'replicas[0].predicted must be an object of non-negative numbers, got {"throughput_rps": -2}'),
    ({"model": 7, "replicas": []}, "model must be a model's name, got 7"),
    ({"model": "m", "replicas": [], "meta": ["x"]}, "meta must be an object"),
])
def test_plan_from_dict_reports_the_path(data, fragment):
    with pytest.raises(PlanError) as err:
        plan_from_dict(data)
    assert fragment in str(err.value)


def test_load_plan_bad_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan file"):
        load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(PlanError, match=r"not valid JSON \(line 1"):
        load_plan(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(single_replica_plan(SPEC, [1], None).to_dict()))
    assert load_plan(ok).replicas[0].stages[0].layers == (0, 6)
