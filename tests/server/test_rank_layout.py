"""How a replica's ranks are laid out on their machines: micro-batches in flight and CPU threads per rank."""

from __future__ import annotations

import os

import pytest

from hexgen.engine.checkpoint import ModelSource
from hexgen.launch.spec import (
    alone_on_cpu,
    cpu_threads_per_rank,
    omp_spin_count,
    pipeline_depth,
    rank_specs,
    takes_turns,
)
from hexgen.models import load_model_spec
from hexgen.plan import Replica, Stage


def replica(*stages: tuple[str, int]) -> Replica:
    """Stages given as (machine, tp), 4 layers each."""
    return Replica(tuple(Stage(m, tuple(range(tp)), tp, (4 * i, 4 * i + 4)) for i, (m, tp) in enumerate(stages)))


def test_gpu_stages_each_keep_a_micro_batch_in_flight():
    assert pipeline_depth(replica(("a", 1), ("a", 2), ("b", 1)), "cuda") == 3


def test_cpu_stages_on_one_machine_take_turns():
    assert pipeline_depth(replica(("localhost", 1), ("localhost", 1)), "cpu") == 1
    assert pipeline_depth(replica(("a", 1), ("a", 1), ("b", 2)), "cpu") == 2  # one per machine
    assert pipeline_depth(replica(("a", 4)), "cpu") == 1


def test_cpu_threads_split_over_the_largest_tp_group_of_each_replica():
    one_process = replica(("localhost", 1))
    two_stages = replica(("localhost", 1), ("localhost", 1))
    tp3_then_tp1 = replica(("localhost", 3), ("localhost", 1))
    assert cpu_threads_per_rank([one_process], 2) == 2
    assert cpu_threads_per_rank([two_stages], 2) == 2  # the stages take turns: each gets both cores
    assert cpu_threads_per_rank([two_stages], 16) == 16
    assert cpu_threads_per_rank([tp3_then_tp1, one_process], 8) == 2  # 3 + 1 ranks at once on 8 cores
    assert cpu_threads_per_rank([tp3_then_tp1, one_process], 2) == 1  # never below one


def test_a_rank_alone_on_a_cpu_machine_spins_at_barriers_longest_ranks_sharing_it_briefly():
    one_process = replica(("localhost", 1))
    two_stages = replica(("localhost", 1), ("localhost", 1))
    assert alone_on_cpu([one_process], "cpu")
    assert not alone_on_cpu([one_process, one_process], "cpu")  # two replicas share the cores
    assert not alone_on_cpu([two_stages], "cpu")  # two stages take turns
    assert not alone_on_cpu([replica(("localhost", 2))], "cpu")
    assert not alone_on_cpu([one_process], "cuda")
    assert omp_spin_count([one_process], "cpu") == 200_000
    assert omp_spin_count([two_stages], "cpu") == 200_000  # stages taking turns release their threads after each
    for shared in ([one_process, one_process], [two_stages, one_process], [replica(("localhost", 2))]):
        assert omp_spin_count(shared, "cpu") == 10_000
    assert omp_spin_count([one_process], "cuda") == 0


def test_only_the_stages_of_a_replica_alone_on_a_cpu_machine_take_turns():
    two_stages = replica(("localhost", 1), ("localhost", 1))
    assert takes_turns([two_stages], "cpu")
    assert takes_turns([replica(("localhost", 2), ("localhost", 1))], "cpu")
    assert not takes_turns([replica(("localhost", 1))], "cpu")  # one stage: nothing to take turns with
    assert not takes_turns([replica(("localhost", 2))], "cpu")  # a TP group's ranks run at once
    assert not takes_turns([two_stages, replica(("localhost", 1))], "cpu")  # replicas run side by side
    assert not takes_turns([two_stages], "cuda")


def test_rank_specs_carry_the_spin_count_of_their_replica_unless_told(tmp_path):
    source = ModelSource("m", tmp_path, load_model_spec("smollm2-135m"))
    two_stages = replica(("localhost", 1), ("localhost", 1))
    specs = rank_specs(source, two_stages, "float32", "cpu")
    assert [(s.spin_count, s.end_turns) for s in specs] == [(200_000, True), (200_000, True)]
    specs = rank_specs(source, two_stages, "float32", "cpu", spin_count=0, end_turns=False)
    assert [(s.spin_count, s.end_turns) for s in specs] == [(0, False), (0, False)]
    assert not any(s.end_turns for s in rank_specs(source, replica(("localhost", 2)), "float32", "cpu"))


def test_a_rank_process_sets_its_spin_count_before_torch_loads_unless_the_user_did(monkeypatch, tmp_path):
    import signal

    import hexgen.engine.worker
    from hexgen.launch import entry

    seen = []
    monkeypatch.setattr(hexgen.engine.worker, "rank_main", lambda *args: seen.append(os.environ.get("GOMP_SPINCOUNT")))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # run_rank ignores SIGINT in its own process
    source = ModelSource("m", tmp_path, load_model_spec("smollm2-135m"))
    spec = rank_specs(source, replica(("localhost", 1), ("localhost", 1)), "float32", "cpu")[0]
    monkeypatch.setenv("GOMP_SPINCOUNT", "")  # records the variable's state before the test, restored after it
    monkeypatch.delenv("GOMP_SPINCOUNT")
    entry.run_rank(spec)
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")  # the user's own setting wins
    entry.run_rank(spec)
    assert seen == ["200000", "0"]


def test_ranks_share_the_cores_the_process_may_run_on_not_the_machines(tmp_path):
    """Under `taskset -c 0` the two stages of a pipeline (which take turns, each with every core) get one thread
    each, whatever os.cpu_count() says (in a child process, so that this one keeps its affinity)."""
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity masks on this platform")
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from hexgen.engine.checkpoint import ModelSource; from hexgen.launch.spec import rank_specs;"
        "from hexgen.machine import usable_cores; from hexgen.models import load_model_spec;"
        "from hexgen.plan import Replica, Stage;"
        "two = Replica((Stage('localhost', (0,), 1, (0, 15)), Stage('localhost', (1,), 1, (15, 30))));"
        "source = ModelSource('m', sys.argv[1], load_model_spec('smollm2-135m'));"
        "print(usable_cores(), [s.num_threads for s in rank_specs(source, two, 'float32', 'cpu')])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "[1,", "1]"]
