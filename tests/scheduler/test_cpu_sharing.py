"""CPU ranks sharing a machine's cores: slowdowns against hand-computed times; GPU machines unchanged."""

from __future__ import annotations

import statistics

import pytest

from hexgen.costmodel import LinearCost, ReplicaCost
from hexgen.dispatch import RoundRobin
from hexgen.sim.host import CpuHost, SharedCores
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import Request


def test_two_busy_one_thread_steps_share_one_core():
    # 1 s of work each on 1 core: the first takes the core, the second gets it when the first ends -> 1 s and
    # 2 s; the pair needs 2 s, half the speed of each alone.
    cores = SharedCores(CpuHost(cores=1, threads_per_rank=1))
    assert cores.run(0.0, 1.0, threads=1) == pytest.approx(1.0)
    assert cores.run(0.0, 1.0, threads=1) == pytest.approx(2.0)


def test_two_busy_one_thread_steps_on_two_cores_run_at_full_speed():
    cores = SharedCores(CpuHost(cores=2, threads_per_rank=1))
    assert cores.run(0.0, 1.0, threads=1) == pytest.approx(1.0)
    assert cores.run(0.0, 1.0, threads=1) == pytest.approx(1.0)


def test_tp3_group_of_one_thread_ranks_on_two_cores_runs_in_two_waves():
    # 3 threads meeting at barriers on 2 cores: two run, then the third alone -> 1 s of work takes 2 s and uses
    # 3 / 2 cores on average; a one-thread step beside it gets the 0.5 core left: 1 s of work -> 2 s.
    cores = SharedCores(CpuHost(cores=2, threads_per_rank=1))
    assert cores.run_stage(0.0, 1.0, tp_degree=3) == pytest.approx(2.0)
    assert cores.run_stage(0.0, 1.0, tp_degree=1) == pytest.approx(2.0)


def test_a_short_busy_stretch_slows_only_the_time_it_overlaps():
    # The coordinator (1 thread) busy for 0.01 s from 0; a 2-thread rank's 0.1 s step starting at 0 gets 1 core
    # for those 0.01 s (pace 2: 0.005 s of work done), then both cores: 0.095 s more -> ends at 0.105.
    cores = SharedCores(CpuHost(cores=2, threads_per_rank=2, coordinator_s_per_token=0.001))
    cores.run_coordinator(0.0, tokens=10)
    assert cores.run_stage(0.0, 0.1, tp_degree=1) == pytest.approx(0.105)


def test_a_step_waits_while_no_core_is_free_then_runs():
    # Two committed one-thread steps fill 2 cores until 1 s; a third starting at 0.5 s waits until 1 s.
    cores = SharedCores(CpuHost(cores=2, threads_per_rank=1))
    cores.run(0.0, 1.0, threads=1)
    cores.run(0.0, 1.0, threads=1)
    assert cores.run(0.5, 0.25, threads=1) == pytest.approx(1.25)


STEP = LinearCost(prefill_fixed_s=0.1, decode_fixed_s=0.1)  # 0.1 s per step whatever the batch
PIPELINE = ReplicaCost((STEP, STEP))  # two stages, no hop costs


def _latency(placement: tuple[tuple[str, int], ...], hosts: dict[str, CpuHost] | None) -> float:
    (done,) = simulate([ReplicaModel(PIPELINE, 4, placement)], [Request(0, 0.0, 5, 3)], RoundRobin(), hosts=hosts)
    return done.latency_s


def test_gpu_machines_and_machines_without_shared_cores_are_unchanged():
    # one request, 3 steps (prefill + 2 decodes) through two 0.1 s stages: 0.6 s
    placement = (("gpu-box", 2), ("gpu-box", 1))
    assert _latency(placement, None) == pytest.approx(0.6)
    assert _latency(placement, {"cpu-box": CpuHost(cores=1, threads_per_rank=1)}) == pytest.approx(0.6)


def test_a_handoff_between_stages_on_one_machine_adds_the_measured_cost():
    # 3 steps of one sequence, each 0.1 s + handoff + 0.1 s on 2 cores (nothing else busy)
    placement = (("cpu-box", 1), ("cpu-box", 1))
    fixed = CpuHost(cores=2, threads_per_rank=1, handoff_s=0.05)
    per_seq = CpuHost(cores=2, threads_per_rank=1, handoff_s=0.05, handoff_seq_s=0.01)
    assert _latency(placement, {"cpu-box": fixed}) == pytest.approx(3 * 0.25)
    assert _latency(placement, {"cpu-box": per_seq}) == pytest.approx(3 * 0.26)
    # stages on different machines hand off over the link only
    apart = (("cpu-box", 1), ("other-box", 1))
    assert _latency(apart, {"cpu-box": fixed, "other-box": fixed}) == pytest.approx(0.6)


def test_tp2_stage_on_one_core_takes_twice_as_long_in_the_simulator():
    # stage 0 is TP 2 of one-thread ranks on 1 core: 2 waves -> 0.2 s; stage 1 (one rank) 0.1 s; 3 steps -> 0.9 s
    placement = (("cpu-box", 2), ("cpu-box", 1))
    assert _latency(placement, {"cpu-box": CpuHost(cores=1, threads_per_rank=1)}) == pytest.approx(0.9)
    assert _latency(placement, {"cpu-box": CpuHost(cores=2, threads_per_rank=1)}) == pytest.approx(0.6)


def test_two_busy_stages_on_one_core_halve_a_pipelines_throughput():
    # Two requests of one token each (prefill only) in two micro-batches through two 0.1 s one-thread stages.
    # Own devices: stage 0 runs A then B (0-0.1, 0.1-0.2), stage 1 runs A 0.1-0.2, B 0.2-0.3 -> done at 0.2, 0.3.
    # One shared machine: its stages take turns (one micro-batch in flight, as the engine runs them there): A
    # passes both stages (0-0.2), then B (0.2-0.4): 0.4 s of work on one core.
    requests = [Request(0, 0.0, 5, 1), Request(1, 0.0, 5, 1)]
    model = ReplicaModel(PIPELINE, 2, (("cpu-box", 1), ("cpu-box", 1)))
    alone = sorted(c.finish_s for c in simulate([model], requests, RoundRobin()))
    shared = sorted(c.finish_s for c in simulate([model], requests, RoundRobin(),
                                                  hosts={"cpu-box": CpuHost(cores=1, threads_per_rank=1)}))
    assert alone == pytest.approx([0.2, 0.3])
    assert shared == pytest.approx([0.2, 0.4])


CPU_BOXES = """
machines:
  - {name: cpu-box, gpu: CPU-worker, count: 5, cpu_cores: 8}
  - {name: gpu-box, gpu: A100-80G, count: 2}
gpu_types:
  CPU-worker: {memory_gb: 4, bandwidth_gbs: 10, tflops_fp16: 0.1}
"""


def test_cpu_cores_in_the_cluster_file_make_a_shared_host_as_serve_runs_it():
    from dataclasses import replace

    from hexgen.cluster import parse_cluster
    from hexgen.plan import DeploymentPlan, Replica, Stage
    from hexgen.sim.run import shared_hosts

    cluster = parse_cluster(CPU_BOXES)
    cpu = cluster.machine("cpu-box")
    cluster = type(cluster)(tuple(replace(m, gpu=replace(m.gpu, colocated_handoff_ms=3.0)) if m is cpu else m
                                  for m in cluster.machines), cluster.network)
    tp3_then_tp1 = Replica((Stage("cpu-box", (0, 1, 2), 3, (0, 20)), Stage("cpu-box", (3,), 1, (20, 30))))
    single = Replica((Stage("cpu-box", (4,), 1, (0, 30)),))
    on_gpus = Replica((Stage("gpu-box", (0, 1), 2, (0, 30)),))
    hosts = shared_hosts(DeploymentPlan("m", (tp3_then_tp1, single, on_gpus)), cluster, 0.001)
    # 8 cores over the largest TP groups of the two CPU replicas (3 + 1): 2 threads per rank; GPUs not shared
    assert hosts == {"cpu-box": CpuHost(8, 2, 0.001, 0.003, 0.0)}


@pytest.mark.parametrize("cores", [0, -2, True, 1.5, "8"])
def test_cpu_cores_must_be_a_positive_integer(cores):
    from hexgen.cluster import parse_cluster
    from hexgen.errors import ConfigError

    text = CPU_BOXES.replace("cpu_cores: 8", f"cpu_cores: {cores!r}" if isinstance(cores, str) else
                             f"cpu_cores: {str(cores).lower()}")
    with pytest.raises(ConfigError, match=r"machines\[0\]: cpu_cores must be a positive integer"):
        parse_cluster(text)


def test_hexgen_simulate_shares_the_cores_of_a_cpu_cores_machine():
    # The same two-stage plan under the same load, with its machine's slots as devices of their own and as ranks
    # sharing one core: sharing can only add time, and must here (two stages, coordinator-free, one core).
    from dataclasses import replace

    from scheduler_helpers import tiny_model

    from hexgen.cluster import parse_cluster
    from hexgen.plan import single_replica_plan
    from hexgen.sim.run import run_plan
    from hexgen.sim.workload import TokenLengths, WorkloadSpec

    model = tiny_model(num_layers=4, hidden=256, heads=4, kv_heads=2, vocab=1000)
    plan = single_replica_plan(model, [1, 1], None)
    plan = type(plan)(plan.model, tuple(type(r)(tuple(replace(s, machine="cpu-box") for s in r.stages))
                                        for r in plan.replicas))
    spec = WorkloadSpec(50.0, 40, TokenLengths(16, 16), TokenLengths(8, 8))
    apart = parse_cluster(CPU_BOXES.replace(", cpu_cores: 8", ""))
    shared = parse_cluster(CPU_BOXES.replace("cpu_cores: 8", "cpu_cores: 1"))
    mean = {name: statistics.mean(c.latency_s for c in run_plan(plan, cluster, model, spec, max_batch=8))
            for name, cluster in (("apart", apart), ("shared", shared))}
    assert mean["shared"] > mean["apart"]


def test_plan_says_which_machines_its_search_does_not_share(tmp_path, capsys):
    from hexgen.cli import main

    for text, shared in ((CPU_BOXES, True), (CPU_BOXES.replace(", cpu_cores: 8", ""), False)):
        cluster = tmp_path / "c.yaml"
        cluster.write_text(text)
        rc = main(["plan", "--cluster", str(cluster), "--model", "llama-2-7b", "--rate", "0.5", "--slo", "20",
                   "--generations", "2", "--requests", "50"])
        out = capsys.readouterr().out
        assert rc == 0 and ("the worker slots of cpu-box as devices of their own" in out) == shared, out
