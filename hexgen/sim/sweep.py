"""Sweeps over SLO scale and request rate, and the figures read off them (lowest scale, peak rate)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hexgen.sim.metrics import attainment, tail_latency_s


def slo_curve(latencies_s: np.ndarray, reference_s: float, scales: list[float]) -> list[float]:
    """SLO attainment at deadline = scale x reference latency, for each scale (one simulation serves all)."""
    return [attainment(latencies_s, s * reference_s) for s in scales]


def lowest_scale(latencies_s: np.ndarray, reference_s: float, target: float = 0.99) -> float:
    """The smallest SLO scale at which at least `target` of the requests meet the deadline."""
    return tail_latency_s(latencies_s, target) / reference_s


def peak_rate(
    attainment_at: Callable[[float], float], low_rps: float, high_rps: float, target: float = 0.99, steps: int = 12
) -> float:
    """Highest rate in [low, high] whose attainment is >= target, by bisection (0 if even `low` misses it)."""
    if attainment_at(low_rps) < target:
        return 0.0
    if attainment_at(high_rps) >= target:
        return high_rps
    for _ in range(steps):
        mid = (low_rps * high_rps) ** 0.5
        if attainment_at(mid) >= target:
            low_rps = mid
        else:
            high_rps = mid
    return low_rps
