"""The fitness a plan search maximises, read off the simulated latencies of a request stream."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hexgen.errors import UserError
from hexgen.planner.genetic import Score
from hexgen.sim.metrics import attainment, tail_latency_s

OBJECTIVES = ("attainment", "tail")


@dataclass(frozen=True)
class Objective:
    """What "better" means for a plan serving a request stream.

    attainment: (share of requests within `slo_s`, -tail latency, -mean latency). The paper's SLO attainment at a
        given deadline; at light load every sensible plan meets a loose deadline, so the tail breaks the tie.
    tail: (-tail latency, -mean latency). The tail latency is the least deadline that `target` of the requests
        meet, so this minimises the "lowest SLO scale reaching 99%" directly.
    """

    kind: str = "attainment"
    slo_s: float = float("inf")
    target: float = 0.99

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise UserError(f"objective {self.kind!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
        if not 0 < self.target <= 1:
            raise UserError(f"target attainment must be in (0, 1], got {self.target}")

    def score(self, latencies_s: np.ndarray) -> Score:
        if not len(latencies_s):
            return (0.0, -float("inf"), -float("inf")) if self.kind == "attainment" else (-float("inf"),) * 2
        tail = (-tail_latency_s(latencies_s, self.target), -float(np.mean(latencies_s)))
        return (attainment(latencies_s, self.slo_s), *tail) if self.kind == "attainment" else tail
