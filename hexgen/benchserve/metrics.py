"""Summary statistics of a run: percentiles of TTFT, TPOT and e2e latency, throughput and SLO attainment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hexgen.benchserve.client import RequestResult
from hexgen.benchserve.config import SloTargets
from hexgen.benchserve.loadgen import RunResult
from hexgen.benchserve.server_engine import EngineFigures

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default): pct 0 is the min, 100 the max."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """Mean and p50/p90/p99 of one per-request metric, in seconds, over `count` requests."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of(values: Sequence[float]) -> Distribution:
        mean = sum(values) / len(values) if values else math.nan
        return Distribution(len(values), mean, *(percentile(values, p) for p in PERCENTILES))


def meets_slo(result: RequestResult, slo: SloTargets) -> bool:
    """A failed request misses every SLO; a request with one output token has no TPOT and so meets a TPOT SLO."""
    if not result.is_ok:
        return False
    tpot_s = result.tpot_s
    return ((slo.ttft_s is None or result.ttft_s <= slo.ttft_s)
            and (slo.tpot_s is None or tpot_s is None or tpot_s <= slo.tpot_s)
            and (slo.e2e_s is None or result.e2e_s <= slo.e2e_s))


@dataclass(frozen=True)
class Summary:
    """The numbers a run reports. Throughputs are over the run's wall time; errors are counted, not timed.
    `short_requests` ended before max_tokens (EOS, or a server that cut the stream short)."""

    completed: int
    failed: int
    duration_s: float
    output_tokens: int
    short_requests: int
    tokens_source: str
    request_throughput_rps: float
    output_throughput_tps: float
    ttft_s: Distribution
    tpot_s: Distribution
    e2e_s: Distribution
    slo_attainment: float | None
    errors: tuple[tuple[str, int], ...]
    engine: EngineFigures | None = None  # a hexgen server's engines during the run (server_engine.py)


def summarize(run: RunResult) -> Summary:
    ok = [r for r in run.requests if r.is_ok]
    failed = [r for r in run.requests if not r.is_ok]
    sources = sorted({r.tokens_source for r in ok})
    output_tokens = sum(r.output_tokens for r in ok)
    duration_s = run.duration_s if run.duration_s > 0 else math.nan
    slo = run.config.slo
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    return Summary(
        completed=len(ok),
        failed=len(failed),
        duration_s=run.duration_s,
        output_tokens=output_tokens,
        short_requests=sum(r.output_tokens < run.config.max_tokens for r in ok),
        tokens_source="+".join(sources) if sources else "none",
        request_throughput_rps=len(ok) / duration_s,
        output_throughput_tps=output_tokens / duration_s,
        ttft_s=Distribution.of([r.ttft_s for r in ok]),
        tpot_s=Distribution.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        e2e_s=Distribution.of([r.e2e_s for r in ok]),
        slo_attainment=(sum(meets_slo(r, slo) for r in run.requests) / len(run.requests))
        if slo.is_set() and run.requests else None,
        errors=tuple(sorted(errors.items(), key=lambda kv: -kv[1])),
        engine=run.engine,
    )
