"""Percentiles, TPOT, SLO attainment and Poisson arrivals against hand-computed values."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from fake_openai_server import FakeServer

from hexgen.benchserve.arrivals import poisson_arrivals_s
from hexgen.benchserve.client import RequestResult
from hexgen.benchserve.config import BenchConfig, SloTargets
from hexgen.benchserve.loadgen import RunResult, run_benchmark
from hexgen.benchserve.metrics import percentile, summarize


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_tpot_is_decode_time_over_tokens_after_the_first():
    assert RequestResult(0.0, ttft_s=0.5, e2e_s=2.5, output_tokens=5).tpot_s == pytest.approx(0.5)
    assert RequestResult(0.0, ttft_s=0.5, e2e_s=0.5, output_tokens=1).tpot_s is None
    assert RequestResult(0.0, error="HTTP 500").tpot_s is None


def test_summary_and_slo_attainment_by_hand():
    requests = (
        RequestResult(0.0, ttft_s=0.1, e2e_s=1.0, output_tokens=10),  # tpot 0.1: meets all
        RequestResult(0.1, ttft_s=0.3, e2e_s=1.2, output_tokens=10),  # ttft misses
        RequestResult(0.2, ttft_s=0.1, e2e_s=2.0, output_tokens=10),  # tpot 0.211 misses, e2e misses
        RequestResult(0.3, ttft_s=0.2, e2e_s=0.2, output_tokens=1),   # no tpot: meets
        RequestResult(0.4, error="HTTP 500: boom"),                   # failed: misses
    )
    slo = SloTargets(ttft_s=0.25, tpot_s=0.15, e2e_s=1.5)
    cfg = BenchConfig(base_url="http://x/v1", model="m", slo=slo)
    s = summarize(RunResult(cfg, requests, duration_s=2.0))
    assert (s.completed, s.failed, s.output_tokens, s.short_requests) == (4, 1, 31, 4)  # max_tokens 64
    assert s.slo_attainment == pytest.approx(2 / 5)
    assert s.request_throughput_rps == pytest.approx(2.0) and s.output_throughput_tps == pytest.approx(15.5)
    assert s.ttft_s.p50 == pytest.approx(0.15) and s.e2e_s.p90 == pytest.approx(1.76)
    assert s.tpot_s.count == 3 and s.tpot_s.p50 == pytest.approx(0.1)
    assert summarize(RunResult(BenchConfig(base_url="http://x/v1", model="m"), requests, 2.0)).slo_attainment is None


def test_poisson_arrivals_have_the_asked_rate_and_repeat_with_the_seed():
    first = poisson_arrivals_s(20.0, random.Random(7))
    times = [next(first) for _ in range(4001)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0.0
    assert statistics.fmean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20.0, rel=0.08)  # exponential: sd equals mean
    again = poisson_arrivals_s(20.0, random.Random(7))
    assert [next(again) for _ in range(4001)] == times


def test_open_loop_sends_on_the_poisson_schedule():
    rate_rps, n = 40.0, 30
    arrivals = poisson_arrivals_s(rate_rps, random.Random(3))
    expected = [next(arrivals) for _ in range(n)]
    cfg = BenchConfig(base_url="http://fake.test/v1", model="fake", concurrency=None, rate_rps=rate_rps,
                      num_requests=n, warmup_requests=0, seed=3)
    run = run_benchmark(cfg, transport=FakeServer(tokens=2).transport())
    starts = [r.start_s for r in run.requests]
    assert max(abs(s - e) for s, e in zip(starts, expected, strict=True)) < 0.05
