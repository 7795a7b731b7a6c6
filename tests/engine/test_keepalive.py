"""An idle replica stays up: its other ranks wait for the next plan in gloo operations that fail after the
process groups' timeout, and the idle driver's keep-alive plans complete those waits in time.

The groups' timeout is shortened to TIMEOUT_S (HEXGEN_DIST_TIMEOUT_S, read by every rank); the replica then idles
for more than twice that (without keep-alives its followers fail after TIMEOUT_S) and must still answer with the
one-process engine's tokens, on a layout with a TP group in each stage (TP broadcasts and leader-to-leader plans).
"""

from __future__ import annotations

import time

import pytest
from engine_helpers import greedy_requests, random_prompts, run_in_process

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.engine import KEEPALIVE_MAX_S, dist_timeout_s, keepalive_interval_s
from hexgen.engine.generation import run_requests
from hexgen.engine.replica import open_local_replica
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import UserError
from hexgen.plan import single_replica_plan

TIMEOUT_S = 8.0  # long enough for the tiny model's ranks to load on a busy CI machine


def test_an_idle_replica_outlives_the_process_groups_timeout(tiny_model_dirs, monkeypatch):
    monkeypatch.setenv("HEXGEN_DIST_TIMEOUT_S", str(TIMEOUT_S))  # inherited by the spawned ranks
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [7, 12], seed=21)
    first, second = greedy_requests(prompts, 6, tag="a"), greedy_requests(prompts, 6, tag="b")
    config = SchedulerConfig(max_context=source.spec.max_context)
    expected, _ = run_in_process(source, first, config)
    plan = single_replica_plan(source.spec, [2, 2], [3, 3])
    replica = open_local_replica(source, plan.replicas[0], "float32", "cpu", config, (), threads_per_rank=1)
    try:
        replica.start()
        before = {c.request_id: c.token_ids for c in run_requests(replica, first)}
        idle_until = time.monotonic() + 2.5 * TIMEOUT_S
        while time.monotonic() < idle_until:  # idle, as a server between requests
            replica.poll(0.2)  # raises ReplicaFailed when a rank fails
        after = {c.request_id.replace("b", "a"): c.token_ids for c in run_requests(replica, second)}
    finally:
        replica.close()
    assert before == expected
    assert after == expected


def test_the_timeout_and_keepalive_interval_follow_the_environment(monkeypatch):
    monkeypatch.delenv("HEXGEN_DIST_TIMEOUT_S", raising=False)
    assert (dist_timeout_s(), keepalive_interval_s()) == (1800.0, KEEPALIVE_MAX_S)
    monkeypatch.setenv("HEXGEN_DIST_TIMEOUT_S", "8")
    assert (dist_timeout_s(), keepalive_interval_s()) == (8.0, 2.0)  # a quarter of a short timeout
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("HEXGEN_DIST_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="HEXGEN_DIST_TIMEOUT_S"):
            dist_timeout_s()
