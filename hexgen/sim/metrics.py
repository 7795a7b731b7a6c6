"""What a simulation reports: SLO attainment, latency percentiles, throughput, cost per hour, tokens per dollar."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hexgen.sim.simulator import Completion


@dataclass(frozen=True)
class SimReport:
    num_requests: int
    slo_s: float
    slo_attainment: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    throughput_rps: float
    output_tokens_per_s: float
    cost_per_hour: float
    tokens_per_dollar: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def attainment(latencies_s: np.ndarray, slo_s: float) -> float:
    """Fraction of requests that finished within the deadline."""
    return float(np.mean(latencies_s <= slo_s)) if len(latencies_s) else 0.0


def tail_latency_s(latencies_s: np.ndarray, target: float = 0.99) -> float:
    """The least deadline that at least `target` of the requests meet: the ceil(target * n)-th smallest latency."""
    if not len(latencies_s):
        return float("inf")
    needed = int(np.ceil(target * len(latencies_s))) - 1
    return float(np.partition(latencies_s, max(needed, 0))[max(needed, 0)])


def summarise(completions: list[Completion], slo_s: float, cost_per_hour: float) -> SimReport:
    if not completions:
        return SimReport(0, slo_s, 0.0, *([float("inf")] * 4), 0.0, 0.0, cost_per_hour, 0.0)
    lat = np.array([c.latency_s for c in completions])
    start = min(c.request.arrival_s for c in completions)
    span_s = max(c.finish_s for c in completions) - start
    tokens = sum(c.request.output_tokens for c in completions)
    tokens_per_s = tokens / span_s if span_s > 0 else 0.0
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return SimReport(
        num_requests=len(completions), slo_s=slo_s, slo_attainment=attainment(lat, slo_s),
        latency_mean_s=float(lat.mean()), latency_p50_s=float(p50), latency_p90_s=float(p90),
        latency_p99_s=float(p99), throughput_rps=len(completions) / span_s if span_s > 0 else 0.0,
        output_tokens_per_s=tokens_per_s, cost_per_hour=cost_per_hour,
        tokens_per_dollar=tokens_per_s * 3600 / cost_per_hour if cost_per_hour > 0 else float("inf"),
    )
