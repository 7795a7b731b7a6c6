"""Best stages on one machine for every layer count: TP degrees, layer split, and which stage is first/last.

Within one machine all links are equal, so the order of its stages does not change their time; what matters is
the multiset of TP degrees, the layer split, and which stage (if any) holds the embedding (pipeline's first stage,
no input broadcast) or the LM head (pipeline's last stage). A stage's time is its extras plus a per-layer time
times its layers, at least one and at most its memory cap. So the table is a knapsack over GPUs and layers:
best[g][l], the least time of `l` layers on stages using at most `g` GPUs, is built by adding one stage at a time
(a min-plus convolution over layers per GPU budget and TP degree): middle stages any number of times, then the
first and the last stage once each with their own extras and caps. The work grows with GPUs x degrees x layers^2,
not with the number of sets of TP groups (17,360 for 64 GPUs of degrees 1, 2, 4 and 8), so no machine is too big.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from hexgen.planner.pricing import StagePricer


@cache
def _gather_index(n: int) -> np.ndarray:
    """G[j, i] indexes (i, j - i) in a flattened n x n matrix, or the sentinel n*n when j < i."""
    j, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.where(j >= i, i * n + (j - i), n * n)


def min_plus(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """c[j] = min_i a[i] + b[j - i], and the minimising i (the lowest on ties). The planner makes millions of
    these on ~80 layer counts, where numpy's per-call cost dominates: one outer sum and one gather is the fastest
    measured (a strided Toeplitz view, or several rows at once, cost more per convolution)."""
    n = len(a)
    flat = np.append((a[:, None] + b[None, :]).ravel(), np.inf)
    values = flat[_gather_index(n)]
    arg = values.argmin(axis=1)
    return values[np.arange(n), arg], arg


@dataclass(frozen=True)
class SegmentStage:
    tp_degree: int
    num_layers: int
    is_first: bool
    is_last: bool


@dataclass(frozen=True)
class _Step:
    """Tables after adding a stage of `role` (middle stages: any number): for each GPU budget and layer count the
    least time, the degree of the stage added last and the layers before it. Budgets are upper bounds: the table
    without stages is 0 for no layers at every budget, so a stage may leave GPUs unused."""

    role: tuple[bool, bool]  # (is_first, is_last)
    costs_s: np.ndarray  # [GPU budget, layers]
    degree: np.ndarray
    before: np.ndarray


class SegmentTable:
    """seg[l]: least time of `l` layers placed on up to `gpu_count` GPUs of one machine (inf: they do not fit)."""

    def __init__(self, pricer: StagePricer, machine: str, gpu_count: int, first: bool, last: bool):
        self._pricer, self._machine = pricer, machine
        self._degrees = [d for d in pricer.tp_degrees(machine) if d <= gpu_count]
        self._hop_s = pricer.hop_s(machine, machine)  # paid before every stage but the first: added to each, less one
        top = pricer.model.num_layers
        nothing = np.full((gpu_count + 1, top + 1), np.inf)
        nothing[:, 0] = 0.0
        self._steps = [self._add_stage(nothing, (False, False), repeat=True)]
        for role, wanted in (((True, False), first), ((False, True), last)):
            if wanted:
                self._steps.append(self._add_stage(self._steps[-1].costs_s, role, repeat=False))
        staged = self._steps[-1].costs_s[gpu_count] - self._hop_s
        if first and last:
            staged = staged + pricer.token_return_s(machine, machine)  # two stages at least: the ids go back
        staged[0] = np.inf
        # A segment that is the whole pipeline may be one stage holding the embedding and the head.
        self._alone = {d: self._stage_s(d, (True, True)) - self._hop_s for d in self._degrees} if first and last else {}
        self._staged_s = staged
        self.costs_s = np.minimum.reduce([staged, *self._alone.values()])

    def _stage_s(self, degree: int, role: tuple[bool, bool]) -> np.ndarray:
        """One stage of `degree` and `role` holding n layers, for every n (inf at 0 and beyond its memory cap)."""
        p, m = self._pricer, self._machine
        n = np.arange(p.model.num_layers + 1)
        cost = p.stage_extra_s(m, degree, *role) + self._hop_s + p.per_layer_s(m, degree) * n
        return np.where((n >= 1) & (n <= p.max_layers(m, degree, *role)), cost, np.inf)

    def _add_stage(self, below: np.ndarray, role: tuple[bool, bool], repeat: bool) -> _Step:
        """The table `below` with one more stage of `role`; with `repeat`, with any number of them (or none)."""
        costs, degree, before = np.full_like(below, np.inf), np.zeros(below.shape, int), np.zeros(below.shape, int)
        stage = {d: self._stage_s(d, role) for d in self._degrees}
        for g in range(len(below)):
            best = below[g].copy() if repeat else np.full(below.shape[1], np.inf)  # repeat: or no stage at all
            for d in self._degrees:
                if d <= g:
                    total, arg = min_plus((costs if repeat else below)[g - d], stage[d])
                    better = total < best
                    best = np.where(better, total, best)
                    degree[g][better], before[g][better] = d, arg[better]
            costs[g] = best
        return _Step(role, costs, degree, before)

    def stages(self, num_layers: int) -> list[SegmentStage]:
        """The stages that achieve costs_s[num_layers], in pipeline order (first, middles by degree, last)."""
        if not np.isfinite(self.costs_s[num_layers]):
            raise ValueError(f"no segment of {num_layers} layers on {self._machine}")
        if self._alone:
            d, cost = min(self._alone.items(), key=lambda kv: kv[1][num_layers])
            if cost[num_layers] <= self._staged_s[num_layers]:
                return [SegmentStage(d, num_layers, True, True)]
        g, left = len(self._steps[0].costs_s) - 1, num_layers
        ends: list[SegmentStage] = []
        for step in reversed(self._steps[1:]):  # the last stage, then the first: one each
            d = int(step.degree[g, left])
            before = int(step.before[g, left])
            ends.append(SegmentStage(d, left - before, *step.role))
            g, left = g - d, before
        middles, step = [], self._steps[0]
        while left > 0:
            d = int(step.degree[g, left])
            before = int(step.before[g, left])
            middles.append(SegmentStage(d, left - before, False, False))
            g, left = g - d, before
        firsts = [s for s in ends if s.is_first]
        lasts = [s for s in ends if s.is_last]
        return firsts + sorted(middles, key=lambda s: -s.tp_degree) + lasts
