"""The pipelined, batched step model against hand-computed times: micro-batches in flight, KV-bounded batches."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hexgen.costmodel import LinearCost, ReplicaCost
from hexgen.dispatch import RoundRobin
from hexgen.sim.servers import BatchingServer, ReplicaModel
from hexgen.sim.simulator import simulate, simulate_streams
from hexgen.sim.workload import Request

STAGE_A = LinearCost(prefill_fixed_s=0.3, prefill_per_token_s=0.01, decode_fixed_s=0.1, decode_per_seq_s=0.01)
STAGE_B = LinearCost(prefill_fixed_s=0.2, prefill_per_token_s=0.02, decode_fixed_s=0.2, decode_per_seq_s=0.02)
HOP = LinearCost(prefill_fixed_s=0.05, decode_fixed_s=0.05)
BACK = LinearCost(prefill_fixed_s=0.01, decode_fixed_s=0.01)
ONE = LinearCost(prefill_fixed_s=0.3, prefill_per_token_s=0.002, decode_fixed_s=0.05, decode_per_seq_s=0.01,
                 decode_per_ctx_token_s=0.0001)


def test_token_time_is_the_loop_alone_and_the_slowest_stage_when_full():
    pipe = ReplicaCost((STAGE_A, STAGE_B), (HOP,), BACK)
    # one sequence: one micro-batch loops A 0.11 + hop 0.05 + B 0.22 + return 0.01 = 0.39
    assert pipe.decode_token_s(1, 100) == pytest.approx(0.39)
    # four sequences in two micro-batches of two: A 0.12, B 0.24; loop 0.42 < B serving both, 2 x 0.24 = 0.48
    assert pipe.decode_token_s(4, 100) == pytest.approx(0.48)
    # a request alone: prefill through everything (0.34 + 0.05 + 0.28 + 0.01), then 2 decode loops of 0.39
    assert pipe.request_latency_s(4, 3) == pytest.approx(0.68 + 2 * 0.39)


def test_capacity_counts_decode_loops_and_each_prompt_along_the_loop():
    pipe = ReplicaCost((STAGE_A, STAGE_B), (HOP,), BACK)
    # 4 running, 10-token prompts, 5 outputs: 4 loops of 0.48. A prompt adds A 10 x 0.01 + (0.3 - 0.1) = 0.3 and
    # B 10 x 0.02 + 0 = 0.2 to its micro-batch, which comes back 0.5 later; a loop (0.42) already waits 0.06 for B
    # to serve both micro-batches (0.48), so the prompt holds the replica up 0.44. One prefill fixed cost of the
    # whole pipeline (0.3 + 0.2 + 0.05 + 0.01).
    assert pipe.prompt_delay_s(4, 10, 5) == pytest.approx(0.44)
    assert pipe.capacity_rps(4, 10, 5) == pytest.approx(4 / (4 * 0.48 + 4 * 0.44 + 0.56))
    # a fast first stage: A' (decode 0.01 + 0.001 a sequence) beside B; 4 running: A' 0.012, B 0.24, loop
    # 0.012 + 0.05 + 0.24 + 0.01 = 0.312 against 0.48, so 0.168 spare; a 10-token prompt adds A' 0.01 x 10 = 0.1
    # and B 0.2: 0.3 - 0.168 = 0.132, less than B's own 0.2, so 0.2
    fast = LinearCost(prefill_fixed_s=0.01, prefill_per_token_s=0.01, decode_fixed_s=0.01, decode_per_seq_s=0.001)
    lopsided = ReplicaCost((fast, STAGE_B), (HOP,), BACK)
    assert lopsided.prompt_delay_s(4, 10, 5) == pytest.approx(0.2)
    # one stage: the prompt's own work
    alone = ReplicaCost.one_stage(STAGE_A)
    assert alone.prompt_delay_s(4, 10, 5) == pytest.approx(0.3)


def test_simulated_pipeline_overlaps_micro_batches():
    # Two requests (4 prompt tokens, 2 outputs) at 0 on A -> B with free hops: the driver splits them into two
    # micro-batches of one. Prefill of r0: A 0-0.34, B 0.34-0.62; r1: A 0.34-0.68, B 0.68-0.96.
    # r0 decodes once r0 is back: A waits for itself to be free (0.68-0.79), B waits for r1 (0.96-1.18);
    # r1 decodes from 0.96: A 0.96-1.07, B 1.18-1.40.
    server = BatchingServer(ReplicaCost((STAGE_A, STAGE_B)), max_batch=2, pool_blocks=100)
    done = {c.request.request_id: c.finish_s for c in _run(server, [Request(0, 0.0, 4, 2), Request(1, 0.0, 4, 2)])}
    assert done == pytest.approx({0: 1.18, 1: 1.40}, abs=1e-12)


def test_one_request_on_a_pipeline_equals_the_closed_form():
    pipe = ReplicaCost((STAGE_A, STAGE_B, ONE), (HOP, HOP), BACK)
    (done,) = simulate([ReplicaModel(pipe, 8)], [Request(0, 1.0, 30, 7)], RoundRobin())
    assert done.latency_s == pytest.approx(pipe.sequential.request_latency_s(30, 7), abs=1e-12)


def test_kv_pool_bounds_the_batch():
    # 16-token blocks, prompt 20 + output 12 = 2 blocks per sequence, a pool of 5 blocks: the scheduler admits
    # a sequence only while a block per running one stays free, so r0 and r1 run (2 + 2 + 1 spare) and r2 waits.
    # r0, r1: prefill 40 tokens 0.3 + 0.08; 11 decode steps 0.05 + 2 x 0.01 + 0.0001 x 2 x (20 + k), k = 1..11
    # -> 0.38 + 0.77 + 0.0572 = 1.2072. r2 then alone: 0.34 + 0.66 + 0.0001 x 286 -> 1.2072 + 1.0286 = 2.2358.
    pool = ReplicaCost.one_stage(ONE, kv_blocks=5)
    assert pool.max_running(8, 20, 12) == 2
    server = BatchingServer(pool, max_batch=8, pool_blocks=5)
    done = sorted(c.finish_s for c in _run(server, [Request(i, 0.0, 20, 12) for i in range(3)]))
    assert done == pytest.approx([1.2072, 1.2072, 2.2358], abs=1e-12)


def _run(server, requests):
    """Drive one server with every request queued at time 0; returns (request, finish time) in finishing order."""
    for r in requests:
        server.add(r)
    out, pending = [], server.start(0.0)
    while pending:
        now = pending.pop(0)  # micro-batches come back in the order they were launched
        out += [Finished(r, now) for r in server.finish()]
        pending += server.start(now)
    return out


@dataclass(frozen=True)
class Finished:
    request: Request
    finish_s: float


def test_one_stream_sends_each_request_when_the_last_ends():
    # closed loop, one client: three requests back to back, each alone on the replica: finish at L, 2L, 3L
    pipe = ReplicaCost((STAGE_A, STAGE_B), (HOP,), BACK)
    alone_s = pipe.request_latency_s(4, 3)  # 0.68 + 2 x 0.39 = 1.46 (first test)
    done = simulate_streams([ReplicaModel(pipe, 16)], 1, 3, 4, 3, RoundRobin())
    assert [c.finish_s for c in done] == pytest.approx([1.46, 2.92, 4.38], abs=1e-12)
    assert all(c.latency_s == pytest.approx(alone_s) for c in done)
