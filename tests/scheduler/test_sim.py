"""The simulator against exact hand results, queueing laws and the arrival process it claims."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest

from hexgen.costmodel import LinearCost, ReplicaCost
from hexgen.dispatch import RoundRobin
from hexgen.sim.metrics import summarise
from hexgen.sim.servers import BatchingServer, ReplicaModel, SequentialServer
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import Request, TokenLengths, WorkloadSpec, generate_requests

COST = LinearCost(prefill_fixed_s=0.3, prefill_per_token_s=0.002, decode_fixed_s=0.05, decode_per_seq_s=0.01,
                  decode_per_ctx_token_s=0.0001)
ONE = ReplicaCost.one_stage(COST)  # a one-stage replica with an unsized KV pool


def test_one_request_equals_prefill_plus_decode_steps():
    req = Request(0, arrival_s=2.0, prompt_tokens=50, output_tokens=3)
    # prefill 0.3 + 0.002*50 = 0.4; decode steps attend over 51 and 52 tokens: 0.06 + 0.0051, 0.06 + 0.0052
    expected = 0.4 + 0.0651 + 0.0652
    for max_batch in (1, 8):
        (done,) = simulate([ReplicaModel(ONE, max_batch)], [req], RoundRobin())
        assert done.latency_s == pytest.approx(expected, abs=1e-12)


def _finish_times(server, requests) -> list[float]:
    """Drive one server with every request queued at time 0; returns finish times in order."""
    for r in requests:
        server.add(r)
    out, pending = [], server.start(0.0)
    while pending:
        now = pending.pop(0)
        out += [now] * len(server.finish())
        pending += server.start(now)
    return out


def test_stepwise_batching_at_one_equals_sequential_server():
    reqs = generate_requests(WorkloadSpec(3.0, 5, TokenLengths(10, 200), TokenLengths(1, 40)), random.Random(7))
    sequential = _finish_times(SequentialServer(COST), reqs)
    stepwise = _finish_times(BatchingServer(ONE, 1, 1000), reqs)
    assert len(sequential) == 5
    assert stepwise == pytest.approx(sequential, abs=1e-9)


def test_continuous_batching_decodes_together():
    # max batch 2, three requests of 4 prompt + 2 output tokens queued at 0 (times by hand from COST):
    # step 1 prefills requests 0 and 1 together: 0.3 + 0.002 * 8 = 0.316
    # step 2 decodes both over 5 + 5 cached tokens: 0.05 + 0.01 * 2 + 0.0001 * 10 = 0.071 -> both done at 0.387
    # step 3 prefills request 2 (0.308), step 4 decodes it (0.0605) -> done at 0.7555
    reqs = [Request(i, 0.0, 4, 2) for i in range(3)]
    assert _finish_times(BatchingServer(ONE, 2, 1000), reqs) == pytest.approx([0.387, 0.387, 0.7555], abs=1e-12)


def test_prefill_joins_a_running_decode_step():
    # A (4 prompt, 3 output) alone: prefill 0.308, decode over 5 tokens 0.0605 -> 0.3685. B (6 prompt, 2 output)
    # arrives at 0.35 and joins the next step with A's decode: one weight scan (max fixed 0.3) + 6 prompt tokens
    # + one decoding sequence over 6 tokens = 0.3 + 0.012 + 0.01 + 0.0006 = 0.3226 -> A done at 0.6911.
    # B then decodes alone over 7 tokens: 0.0607 -> done at 0.7518.
    a, b = Request(0, 0.0, 4, 3), Request(1, 0.35, 6, 2)
    done = {c.request.request_id: c for c in simulate([ReplicaModel(ONE, 2)], [a, b], RoundRobin())}
    assert done[0].finish_s == pytest.approx(0.6911, abs=1e-12)
    assert done[1].finish_s == pytest.approx(0.7518, abs=1e-12)


def test_poisson_rate_and_gamma_burstiness():
    spec = WorkloadSpec(4.0, 20000, TokenLengths.fixed(8), TokenLengths.fixed(8))
    times = [r.arrival_s for r in generate_requests(spec, random.Random(1))]
    assert len(times) / times[-1] == pytest.approx(4.0, rel=0.03)
    gaps = np.diff([0.0] + [r.arrival_s for r in generate_requests(
        WorkloadSpec(4.0, 20000, TokenLengths.fixed(8), TokenLengths.fixed(8), "gamma", cv=3.0), random.Random(1))])
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_littles_law_and_utilisation():
    service_s = COST.request_latency_s(20, 5)
    rate = 0.6 / service_s  # utilisation 0.6 on one replica
    spec = WorkloadSpec(rate, 20000, TokenLengths.fixed(20), TokenLengths.fixed(5))
    done = simulate([ReplicaModel(ONE, 1)], generate_requests(spec, random.Random(3)), RoundRobin())
    start = min(c.request.arrival_s for c in done)
    span = max(c.finish_s for c in done) - start
    # Little: time-average number in system = throughput x mean time in system (areas computed independently)
    in_system_area = sum(c.finish_s - c.request.arrival_s for c in done)
    throughput = len(done) / span
    assert in_system_area / span == pytest.approx(throughput * statistics.fmean(c.latency_s for c in done))
    assert len(done) * service_s / span == pytest.approx(0.6, rel=0.03)
    # M/D/1 mean wait: rho * S / (2 (1 - rho)) = 0.6 S / 0.8
    mean_wait = statistics.fmean(c.latency_s for c in done) - service_s
    assert mean_wait == pytest.approx(0.75 * service_s, rel=0.08)


def test_report_fields():
    reqs = [Request(i, float(i), 10, 2) for i in range(4)]
    done = simulate([ReplicaModel(ONE, 1)], reqs, RoundRobin())
    rep = summarise(done, slo_s=1.0, cost_per_hour=3.6)
    latency = 0.3 + 0.02 + 0.06 + 0.0011  # never queued: arrivals 1 s apart
    assert rep.latency_p99_s == pytest.approx(latency)
    assert rep.slo_attainment == 1.0
    assert rep.tokens_per_dollar == pytest.approx(rep.output_tokens_per_s * 3600 / 3.6)


def test_dispatch_weights_given_as_a_server_had_them():
    # Four requests at once to two identical replicas weighted 1 : 3 by capacity: (outstanding + 1) / weight picks
    # replica 1 (1/3), replica 1 (2/3), replica 0 on the tie at 1 (lower index), then replica 1 (4/3 < 2).
    from hexgen.dispatch import CapacityWeighted

    step = LinearCost(prefill_fixed_s=0.1, decode_fixed_s=0.1)
    models = [ReplicaModel(ReplicaCost((step,)), 4), ReplicaModel(ReplicaCost((step,)), 4)]
    requests = [Request(i, 0.0, 4, 2) for i in range(4)]
    done = simulate(models, requests, CapacityWeighted(), weights=[1.0, 3.0])
    assert sorted(c.replica for c in done) == [0, 1, 1, 1]
    alike = simulate(models, requests, CapacityWeighted())  # equal models, equal weights: alternate
    assert sorted(c.replica for c in alike) == [0, 0, 1, 1]
