"""CPU ranks sharing a machine's cores: slowdowns against hand-computed times; GPU machines unchanged."""

from __future__ import annotations

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
