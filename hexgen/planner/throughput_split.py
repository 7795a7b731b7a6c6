"""A batching pipeline's layers re-split for throughput: its slowest stage as fast as memory allows.

The DP (dp.py) adds stage times up, which is a replica's step when its stages run one after another. A batching
replica keeps a micro-batch in every stage, so at full load its rate follows its slowest stage (costmodel/
pipeline.py). Where the DP's stages differ in speed (GPU types, TP degrees, the LM head on the last), moving
layers off the slowest stage raises throughput, though it may lengthen one request's step, the sum the DP
minimised. Among the DP's stages (machines and TP degrees kept) the split that minimises the largest stage time
under each stage's memory cap is found by filling: every stage starts with one layer, and each further layer goes
where the stage it lands on stays fastest. That is optimal for costs that grow with the layers: were the filling's
largest time above the best split's, then when it first went above, every stage would already hold as many layers
as fit under the best split's largest time, and those add up to all the layers at least.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class StageRate:
    """One stage's time for a full batch: `extra_s` once, plus `per_layer_s` for each of its layers, at most
    `max_layers` of them."""

    per_layer_s: float
    extra_s: float
    max_layers: int

    def time_s(self, layers: int) -> float:
        return self.extra_s + layers * self.per_layer_s


def min_max_split(stages: list[StageRate], num_layers: int) -> list[int] | None:
    """Layers per stage (each at least one, at most its cap, `num_layers` in all) with the smallest largest stage
    time; ties go to the earlier stage. None when the caps cannot hold the layers."""
    caps = [s.max_layers for s in stages]
    if num_layers < len(stages) or min(caps) < 1 or sum(caps) < num_layers:
        return None
    split = [1] * len(stages)
    heap = [(s.time_s(2), i) for i, s in enumerate(stages) if s.max_layers > 1]
    heapq.heapify(heap)
    for _ in range(num_layers - len(stages)):
        _, i = heapq.heappop(heap)
        split[i] += 1
        if split[i] < stages[i].max_layers:
            heapq.heappush(heap, (stages[i].time_s(split[i] + 1), i))
    return split
