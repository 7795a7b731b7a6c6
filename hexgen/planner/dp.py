"""The fastest pipeline for one group of GPUs: which machines, in which order, their stages, TP and layers.

Dynamic programming over (first machine, machines visited, last machine) -> best latency for every count of
layers placed so far (Held-Karp over machine orders, with a min-plus convolution over layer counts). Each
machine contributes one contiguous run of stages whose best layout per layer count is a SegmentTable.
A pipeline visits a machine at most once. Groups of more than MAX_EXACT_MACHINES machines are ordered by
(region, GPU type, GPU counts, name) and the DP chooses which of them to use in that order.

Machines of one class (same region, GPU type, GPU counts and CPU cores, and named in no link override) are
interchangeable in every figure the pricer gives, so a group is solved once per class signature: a group equal to
a solved one up to swapping machines of a class gets the solved layout with its machines renamed. In a large
cluster of few machine kinds the search meets thousands of groups but a few hundred signatures.

"Fastest" is StagePricer's objective: one request's latency when replicas serve one request at a time, the
time of one full batch (inverse throughput) when they batch.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from hexgen.planner.pricing import StagePricer
from hexgen.planner.segments import SegmentTable, min_plus

MAX_EXACT_MACHINES = 6
Group = tuple[tuple[str, int], ...]  # (machine name, GPUs of that machine in the group), sorted


@dataclass(frozen=True)
class LayoutStage:
    machine: str
    tp_degree: int
    num_layers: int


@dataclass(frozen=True)
class PipelineLayout:
    """A replica's stages in order and its DP objective: latency of one request alone (batch 1), or of a full batch."""

    stages: tuple[LayoutStage, ...]
    latency_s: float


@dataclass
class _State:
    costs_s: np.ndarray
    prev: np.ndarray  # per layer count: index of the predecessor state (-1: this is the first machine)
    take: np.ndarray  # per layer count: layers placed on this state's last machine


class PipelineSolver:
    """Best pipeline per group, memoised; one solver per (cluster, model, workload, cost config)."""

    def __init__(self, pricer: StagePricer):
        self.pricer = pricer
        self._overridden = {name for pair, _ in pricer.cluster.network.overrides for name in pair}
        self.class_key = cache(self._class_key)
        self._segments: dict[tuple, SegmentTable] = {}
        self._solved: dict[tuple, tuple[tuple[str, ...], PipelineLayout | None]] = {}

    def _class_key(self, machine: str, count: int) -> tuple:
        """Machines with equal keys (`count` of their GPUs in the group) price alike everywhere: same region (so
        the same links to every other machine), GPU type, GPU counts and cores, and no link override naming them."""
        m = self.pricer.cluster.machine(machine)
        own = machine if machine in self._overridden else ""
        return m.region, m.gpu.name, m.count, m.cpu_cores or 0, count, own

    def segment(self, machine: str, count: int, first: bool, last: bool) -> SegmentTable:
        """The best stages on `count` GPUs of `machine`, shared by every machine of its class."""
        key = (self.class_key(machine, count), first, last)
        if key not in self._segments:
            self._segments[key] = SegmentTable(self.pricer, machine, count, first, last)
        return self._segments[key]

    def best(self, group: Group) -> PipelineLayout | None:
        """The group's fastest pipeline (None: it cannot hold the model), memoised by class signature."""
        ordered = sorted(group, key=lambda mc: (self.class_key(*mc), mc[0]))
        signature = tuple(self.class_key(*mc) for mc in ordered)
        names = tuple(m for m, _ in ordered)
        if signature not in self._solved:
            self._solved[signature] = (names, self._solve(ordered))
        solved_names, layout = self._solved[signature]
        if layout is None or solved_names == names:
            return layout
        rename = dict(zip(solved_names, names, strict=True))
        return replace(layout, stages=tuple(replace(s, machine=rename[s.machine]) for s in layout.stages))

    def _solve(self, ordered: list[tuple[str, int]]) -> PipelineLayout | None:
        """The DP over machines in the given (class-sorted) order; equal signatures give positionally equal
        layouts, as every figure it reads is a function of the position's class."""
        machines = [m for m, _ in ordered]
        counts = dict(ordered)
        keys_of = [self.class_key(*mc) for mc in ordered]
        runs = [k if k == 0 or keys_of[k] != keys_of[k - 1] else 0 for k in range(len(keys_of))]
        runs = list(itertools.accumulate(runs, max))  # runs[k]: the first machine of k's class (classes are contiguous)
        top = self.pricer.model.num_layers
        best_s, best_path = np.inf, None
        for f, m in enumerate(machines):
            cost = self.segment(m, counts[m], True, True).costs_s[top] if runs[f] == f else np.inf
            if cost < best_s:
                best_s, best_path = cost, [(m, top, True, True)]
        states, keys = self._expand(machines, counts, runs)
        for sid, (f, _, j) in enumerate(keys):
            st = states[keys[sid]]
            for k in range(len(machines)):
                if not self._may_visit(keys[sid], k, runs):
                    continue
                last_seg = self.segment(machines[k], counts[machines[k]], False, True).costs_s
                totals = st.costs_s + last_seg[::-1] + self._hop(machines, j, k) + self._return(machines, k, f)
                i = int(totals.argmin())
                if totals[i] < best_s:
                    best_s = float(totals[i])
                    best_path = self._path(states, keys, sid, i, machines) + [(machines[k], top - i, False, True)]
        if best_path is None:
            return None
        return PipelineLayout(self._stages(best_path, counts), float(best_s))

    @staticmethod
    def _may_visit(key: tuple[int, int | None, int], k: int, runs: list[int]) -> bool:
        """Whether a partial pipeline may go on to machine k: k is unused (exact) or after the last machine
        (ordered), and k is its class's first unused machine. Any pipeline through a later machine of a class
        that skips an earlier one costs the same with the two swapped, so only these are expanded."""
        _, mask, j = key
        if mask is None:
            return k == (runs[k] if runs[k] > j else j + 1)
        before = (1 << (k - runs[k])) - 1  # the machines of k's class ahead of it, as bits from runs[k]
        return not mask & (1 << k) and (mask >> runs[k]) & before == before

    def _hop(self, machines: list[str], j: int, k: int) -> float:
        return self.pricer.hop_s(machines[j], machines[k])

    def _return(self, machines: list[str], k: int, f: int) -> float:
        return self.pricer.token_return_s(machines[k], machines[f])

    def _expand(self, machines: list[str], counts: dict[str, int], runs: list[int]):
        """All partial pipelines (no last machine yet), in an order where predecessors come first."""
        n, top = len(machines), self.pricer.model.num_layers
        exact = n <= MAX_EXACT_MACHINES
        states: dict[tuple, _State] = {}
        for f, m in enumerate(machines):
            if runs[f] != f:
                continue  # a pipeline may start on its class's first machine only (see _may_visit)
            seg = self.segment(m, counts[m], True, False).costs_s
            key = (f, 1 << f if exact else None, f)
            states[key] = _State(seg.copy(), np.full(top + 1, -1), np.arange(top + 1))
        keys: list[tuple] = []

        def order(key: tuple) -> tuple:  # machines used (exact) or the last machine's index, then the key
            return (bin(key[1]).count("1") if exact else key[2], key)

        frontier = [order(key) for key in states]  # a heap: ~n^2 / 2 states, each adding up to n (no re-sorts)
        heapq.heapify(frontier)
        while frontier:
            key = heapq.heappop(frontier)[1]
            keys.append(key)
            sid, st = len(keys) - 1, states[key]
            if not np.isfinite(st.costs_s).any():
                continue
            for k in range(n):
                if not self._may_visit(key, k, runs):
                    continue
                seg = self.segment(machines[k], counts[machines[k]], False, False).costs_s
                costs, arg = min_plus(st.costs_s, seg)
                costs = costs + self._hop(machines, key[2], k)
                new_key = (key[0], key[1] | (1 << k) if exact else None, k)
                if new_key not in states:
                    states[new_key] = _State(np.full(top + 1, np.inf), np.full(top + 1, -1), np.zeros(top + 1, int))
                    heapq.heappush(frontier, order(new_key))
                target = states[new_key]
                better = costs < target.costs_s
                target.costs_s[better] = costs[better]
                target.prev[better] = sid
                target.take[better] = (np.arange(top + 1) - arg)[better]
        return states, keys

    @staticmethod
    def _path(states, keys, sid: int, layers: int, machines: list[str]) -> list[tuple[str, int, bool, bool]]:
        """Walk back from state `sid` holding `layers` layers to the first machine."""
        path = []
        while True:
            st, key = states[keys[sid]], keys[sid]
            take, prev = int(st.take[layers]), int(st.prev[layers])
            path.append((machines[key[2]], take, prev == -1, False))
            if prev == -1:
                return path[::-1]
            sid, layers = prev, layers - take

    def _stages(self, path: list[tuple[str, int, bool, bool]], counts: dict[str, int]) -> tuple[LayoutStage, ...]:
        out = []
        for machine, layers, first, last in path:
            for s in self.segment(machine, counts[machine], first, last).stages(layers):
                out.append(LayoutStage(machine, s.tp_degree, s.num_layers))
        return tuple(out)
