"""Stages taking turns on one CPU machine's cores release their OpenMP worker threads after each turn
(engine/turns.py): the workers are gone once released, the next parallel region starts new ones that compute the
same, and a two-stage replica whose ranks end their turns so gives the one-process engine's tokens while holding one
thread fewer per rank between turns than the same replica told not to."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from engine_helpers import greedy_requests, random_prompts, run_in_process

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.generation import run_requests
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.launch.entry import run_rank
from hexgen.launch.local import LocalReplica
from hexgen.launch.spec import rank_specs
from hexgen.plan import single_replica_plan

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc (libgomp)")

SCRIPT = """
import os
from hexgen.engine.turns import release_worker_threads
early = release_worker_threads()  # before torch: no libgomp to find, and none loaded for the asking
loaded_early = "libgomp" in open("/proc/self/maps").read()
import torch
torch.set_num_threads(3)
x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
def threads():
    return len(os.listdir("/proc/self/task"))
before = x @ x
busy = threads()
released = release_worker_threads()
idle = threads()
again = x @ x
print(early, loaded_early, released, busy - idle, threads() - idle, torch.equal(before, again))
"""


@linux_only
def test_released_workers_end_and_the_next_parallel_region_starts_new_ones():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    # nothing before torch; then of 3 threads, 2 workers gone and back again, the same product
    assert done.stdout.split() == ["False", "False", "True", "2", "2", "True"]


def same_named_threads(pid: int) -> int:
    """Threads of process `pid` named as its main thread (OpenMP's workers are; gloo's and ZeroMQ's are not)."""
    name = Path(f"/proc/{pid}/comm").read_text()
    return sum(1 for task in Path(f"/proc/{pid}/task").iterdir() if (task / "comm").read_text() == name)


def run_two_stages(source, requests, config, end_turns: bool) -> tuple[dict, list[int]]:
    """Tokens of a two-stage CPU replica with 2 threads per rank, and each rank's same-named threads once idle."""
    plan = single_replica_plan(source.spec, [1, 1], [source.spec.num_layers // 2, source.spec.num_layers // 2])
    specs = [replace(spec, end_turns=end_turns)
             for spec in rank_specs(source, plan.replicas[0], "float32", "cpu", threads_per_rank=2)]
    replica = LocalReplica(run_rank, [(spec, config, ()) for spec in specs])
    try:
        replica.start()
        tokens = {c.request_id: c.token_ids for c in run_requests(replica, requests)}
        time.sleep(0.5)  # the last turn's release happens after its tokens are sent
        pids = [replica.processes.placement(rank)["pid"] for rank in range(replica.world_size)]
        return tokens, [same_named_threads(pid) for pid in pids]
    finally:
        replica.close()


@linux_only
def test_two_stages_ending_their_turns_give_the_same_tokens_and_hold_no_idle_workers(tiny_model_dirs):
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    requests = greedy_requests(random_prompts(source.spec.vocab_size, [5, 11, 8], seed=5), 6)
    config = SchedulerConfig(max_context=source.spec.max_context)
    expected, _ = run_in_process(source, requests, config)
    ending, ending_threads = run_two_stages(source, requests, config, end_turns=True)
    keeping, keeping_threads = run_two_stages(source, requests, config, end_turns=False)
    assert ending == expected
    assert keeping == expected
    assert [k - e for k, e in zip(keeping_threads, ending_threads, strict=True)] == [1, 1], (
        f"threads named as each rank's main thread: {ending_threads} ending turns, {keeping_threads} not")


def test_only_cpu_ranks_told_to_end_turns_release_their_threads(tiny_model_dirs):
    from hexgen.engine.engine import build_runner, init_rank
    from hexgen.engine.turns import release_worker_threads

    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    plan = single_replica_plan(source.spec, [1], [source.spec.num_layers])
    spec = rank_specs(source, plan.replicas[0], "float32", "cpu")[0]
    config = SchedulerConfig(max_context=64)
    assert build_runner(replace(spec, end_turns=True), init_rank(spec), config).end_turn is release_worker_threads
    assert build_runner(spec, init_rank(spec), config).end_turn is not release_worker_threads
