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
import math
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
    # The filling takes the num_layers - len(stages) cheapest of the times time_s(k), k = 2 .. cap, of every stage
    # (ties to the earlier stage). Every one below a bound that at most that many are below is taken at once (the
    # planner splits hundreds of pipelines a group); the heap takes the rest in order.
    bound = _water_level(stages, num_layers)
    split = [max(1, _layers_below(s, bound)) for s in stages]
    if sum(split) > num_layers:  # rounding put the bound past the cheapest time left out: fill from one layer each
        split = [1] * len(stages)
    heap = [(s.time_s(n + 1), i) for i, (s, n) in enumerate(zip(stages, split, strict=True)) if n < s.max_layers]
    heapq.heapify(heap)
    for _ in range(num_layers - sum(split)):
        _, i = heapq.heappop(heap)
        split[i] += 1
        if split[i] < stages[i].max_layers:
            heapq.heappush(heap, (stages[i].time_s(split[i] + 1), i))
    return split


def _water_level(stages: list[StageRate], num_layers: int) -> float:
    """A time T below which at most num_layers - len(stages) of the filling's times lie: the T at which stages that
    reach it, each holding (T - extra_s) / per_layer_s layers, hold num_layers between them (caps aside, which
    only lower the count)."""
    active = [s for s in stages if s.per_layer_s > 0]
    if len(active) < len(stages):
        return float("-inf")  # a stage of free layers: no bound, fill from one layer each
    while active:
        inverse = sum(1 / s.per_layer_s for s in active)
        level = (num_layers - (len(stages) - len(active)) + sum(s.extra_s / s.per_layer_s for s in active)) / inverse
        below = [s for s in active if (level - s.extra_s) / s.per_layer_s < 1]
        if not below:  # every active stage holds at least one layer at this level: the count sums to num_layers
            return level
        active = [s for s in active if s not in below]
    return float("-inf")


def _layers_below(stage: StageRate, bound: float) -> int:
    """One layer, plus every further one whose stage time stays below `bound`, up to the stage's cap."""
    if bound == float("-inf"):
        return 1
    n = min(stage.max_layers, max(1, math.ceil((bound - stage.extra_s) / stage.per_layer_s) - 1))
    while n > 1 and stage.time_s(n) >= bound:  # exact against time_s's own rounding
        n -= 1
    while n < stage.max_layers and stage.time_s(n + 1) < bound:
        n += 1
    return n
