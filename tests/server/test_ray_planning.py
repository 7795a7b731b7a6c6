"""The torch-free and Ray-free parts of serving across machines: a plan checked against the live machines, GPU names
matched to the built-in table, the probe's cluster YAML, and the free slots a re-plan may use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hexgen.cluster import parse_cluster
from hexgen.errors import PlanError
from hexgen.plan import DeploymentPlan, Replica, Stage
from hexgen.raycluster.cluster_file import MachineReport, cluster_yaml, gpu_type_name
from hexgen.server.ray_launch import check_against_cluster
from hexgen.server.replan import free_cluster, on_free_slots


def plan_of(*replicas: list[tuple[str, tuple[int, ...]]]) -> DeploymentPlan:
    return DeploymentPlan("tiny", tuple(Replica(tuple(Stage(m, g, len(g), (0, 1)) for m, g in r)) for r in replicas))


def test_plan_against_live_machines():
    slots = {"a": 2.0, "b": 1.0}
    check_against_cluster(plan_of([("a", (0, 1))], [("b", (0,))]), slots)
    with pytest.raises(PlanError, match=r"machine 'z' is not in the Ray cluster; machines there: a \(2 slots\), b"):
        check_against_cluster(plan_of([("z", (0,))]), slots)
    with pytest.raises(PlanError, match="puts 2 ranks on machine 'b', which has 1 slots"):
        check_against_cluster(plan_of([("b", (0,))], [("b", (1,))]), slots)
    with pytest.raises(PlanError, match="uses GPU 2 of machine 'a'"):
        check_against_cluster(plan_of([("a", (2,))]), slots)


@pytest.mark.parametrize("name, memory_gb, expected", [
    ("NVIDIA H100 80GB HBM3", 79.1, "H100"), ("NVIDIA H200", 139.8, "H200"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100-80G"), ("NVIDIA A100-PCIE-40GB", 39.4, "A100-40G"),
    ("NVIDIA GeForce RTX 3090 Ti", 23.6, "RTX3090Ti"), ("NVIDIA GeForce RTX 3090", 23.6, "RTX3090"),
    ("NVIDIA L40S", 44.4, "L40S"), ("NVIDIA L4", 22.0, "L4"), ("NVIDIA RTX A4000", 15.7, "A4000"),
    ("Tesla T4", 14.7, "T4"), ("AMD Instinct MI300X", 191.0, None),
])  # fmt: skip
def test_gpu_names_match_the_table(name, memory_gb, expected):
    assert gpu_type_name(name, memory_gb) == expected


def test_probe_results_make_a_cluster_file_plan_reads():
    gpu = {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 8, "gpu_memory_gb": 79.1, "bandwidth_gbs": 2900.0,
           "tflops": 700.0}
    odd = {"gpu_name": "Weird GPU 9000", "gpu_count": 2, "gpu_memory_gb": 31.5, "bandwidth_gbs": 800.0, "tflops": 90.0}
    cpu = {"gpu_name": None, "gpu_count": 0, "gpu_memory_gb": 0.0, "bandwidth_gbs": 20.0, "tflops": 0.4}
    reports = [MachineReport("big", "10.0.0.1", 8, 500.0, gpu), MachineReport("odd", "10.0.0.2", 2, 60.0, odd),
               MachineReport("cpu", "10.0.0.3", 4, 16.0, cpu)]
    links = {("big", "odd"): (0.2, 9.5), ("big", "cpu"): (0.3, 4.0), ("odd", "cpu"): (0.25, 5.0)}
    cluster = parse_cluster(cluster_yaml(reports, links))
    assert [(m.name, m.gpu.name, m.count) for m in cluster.machines] == [
        ("big", "H100", 8), ("odd", "Weird-GPU-9000", 2), ("cpu", "CPU-cpu", 4)]
    assert cluster.machine("odd").gpu.memory_gb == 31.5
    assert cluster.machine("cpu").gpu.memory_gb == 4.0 and cluster.machine("cpu").gpu.bandwidth_gbs == 5.0
    assert (cluster.link("big", "cpu").bandwidth_gbps, cluster.link("big", "cpu").latency_ms) == (4.0, 0.3)


def test_replan_uses_only_free_slots_of_live_machines():
    cluster = parse_cluster("machines:\n  - {name: a, gpu: T4, count: 3}\n  - {name: b, gpu: T4, count: 2}\n"
                            "  - {name: c, gpu: T4, count: 2}\n")
    serving = SimpleNamespace(status="up", plan=Replica((Stage("a", (1,), 1, (0, 1)),)))
    lost = SimpleNamespace(status="down", plan=Replica((Stage("a", (0,), 1, (0, 1)), Stage("b", (0,), 1, (1, 2)))))
    free, slots = free_cluster(cluster, {"a": 3.0, "c": 2.0}, [serving, lost])
    assert {m.name: m.count for m in free.machines} == {"a": 2, "c": 2}
    assert slots == {"a": [0, 2], "c": [0, 1]}
    planned = Replica((Stage("a", (0, 1), 2, (0, 1)), Stage("c", (1,), 1, (1, 2))))
    assert [s.gpus for s in on_free_slots(planned, slots).stages] == [(0, 2), (1,)]


@pytest.mark.parametrize("ray_ids,visible,index", [
    (["3"], "3", 0),  # Ray's default: the actor sees its own GPU only, as device 0
    ([3], "3", 0),  # ids as integers
    (["2"], "0,1,2,3", 2),  # the node keeps its whole list (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1)
    (["5"], "4, 5", 1),
    (["1"], None, 1),  # nothing masked: the id is the device
    ([], None, 0),
])
def test_a_ray_actor_runs_on_the_gpu_ray_gave_it(ray_ids, visible, index):
    from hexgen.raycluster.env import local_gpu_index

    assert local_gpu_index(ray_ids, visible) == index
