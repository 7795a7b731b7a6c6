"""Open-loop arrival times: a seeded Poisson process."""

from __future__ import annotations

import random
from collections.abc import Iterator


def poisson_arrivals_s(rate_rps: float, rng: random.Random) -> Iterator[float]:
    """Yield arrival offsets in seconds from t=0 (the first at 0), with exponential gaps of mean 1/rate_rps."""
    t_s = 0.0
    while True:
        yield t_s
        t_s += rng.expovariate(rate_rps)
