"""The fastest pipeline for one group of GPUs: which machines, in which order, their stages, TP and layers.

Dynamic programming over (first machine, machines visited, last machine) -> best latency for every count of
layers placed so far (Held-Karp over machine orders, with a min-plus convolution over layer counts). Each
machine contributes one contiguous run of stages whose best layout per layer count is a SegmentTable.
A pipeline visits a machine at most once. Groups of more than MAX_EXACT_MACHINES machines are ordered by
(region, name) and the DP chooses which of them to use in that order.

Machines of one class (same region, GPU type, GPU counts and CPU cores, and named in no link override) are
interchangeable in every figure the pricer gives. So the DP goes on only to the first machine of a class it may
still use, and a group is solved once per class signature (its classes sorted, or in the group's order past
MAX_EXACT_MACHINES): a group equal to a solved one up to swapping machines of a class gets the solved layout with
its machines renamed. In a large cluster of few machine kinds the search meets thousands of groups but far fewer
signatures.

"Fastest" is StagePricer's objective: one request's latency when replicas serve one request at a time, the
time of one full batch (inverse throughput) when they batch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
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

    def renamed(self, old: tuple[str, ...], new: tuple[str, ...]) -> PipelineLayout:
        """The same layout with machine old[i] replaced by new[i] (alike machines: same class, see PipelineSolver)."""
        names = dict(zip(old, new, strict=True))
        return replace(self, stages=tuple(replace(s, machine=names[s.machine]) for s in self.stages))


@dataclass
class _State:
    costs_s: np.ndarray
    prev: np.ndarray  # per layer count: index of the predecessor state (-1: this is the first machine)
    take: np.ndarray  # per layer count: layers placed on this state's last machine


@dataclass
class _GroupTables:
    """One group's machines in DP order with the figures the DP reads, as arrays indexed by position."""

    machines: list[str]
    counts: dict[str, int]
    same_before: list[int]  # bit mask of the positions before k of machines of k's class
    exact: bool  # every machine order (Held-Karp over subsets), else the given order only
    middle: np.ndarray  # [k, layers]: machine k's best segment in the middle of a pipeline
    last_reversed: np.ndarray  # [k, i]: machine k's best last segment of (all layers - i)
    hop_s: np.ndarray  # [j, k]: activations from machine j to machine k
    return_s: np.ndarray  # [k, f]: token ids from the last machine k back to the first f
    _nexts: dict = field(default_factory=dict)

    @classmethod
    def of(cls, solver: PipelineSolver, ordered: list[tuple[str, int]]) -> _GroupTables:
        machines, p = [m for m, _ in ordered], solver.pricer
        keys = [solver.class_key(*mc) for mc in ordered]
        same_before = [sum(1 << i for i in range(k) if keys[i] == keys[k]) for k in range(len(keys))]
        return cls(machines, dict(ordered), same_before, len(machines) <= MAX_EXACT_MACHINES,
                   np.stack([solver.segment(m, n, False, False).costs_s for m, n in ordered]),
                   np.stack([solver.segment(m, n, False, True).costs_s[::-1] for m, n in ordered]),
                   np.array([[p.hop_s(a, b) for b in machines] for a in machines]),
                   np.array([[p.token_return_s(a, b) for b in machines] for a in machines]))

    def may_start(self, f: int) -> bool:
        return self.same_before[f] == 0  # the first machine of its class (see nexts)

    def nexts(self, key: tuple[int, int | None, int]) -> list[int]:
        """The machines a partial pipeline may go on to: unused (exact) or after its last machine (ordered), and
        each the first of its class that it may still use. A pipeline through a later machine of a class, where
        it could use an earlier one, costs the same with the two swapped (and, in order, keeps every machine it
        may go on to), so only these are expanded."""
        _, mask, j = key
        memo = (mask, j)
        if memo not in self._nexts:
            before = self.same_before
            if mask is None:  # no machine of k's class strictly between j and k
                self._nexts[memo] = [k for k in range(j + 1, len(before)) if before[k] >> (j + 1) == 0]
            else:  # every machine of k's class ahead of it already used
                self._nexts[memo] = [k for k in range(len(before)) if not mask & (1 << k)
                                     and mask & before[k] == before[k]]
        return self._nexts[memo]


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
        if len(group) <= MAX_EXACT_MACHINES:  # every order is tried: sorting by class makes alike groups share
            ordered = self.by_class(group)
        else:  # the order is the search's constraint: by region, then name
            ordered = sorted(group, key=lambda mc: (self.pricer.cluster.machine(mc[0]).region, mc[0]))
        signature = tuple(self.class_key(*mc) for mc in ordered)
        names = tuple(m for m, _ in ordered)
        if signature not in self._solved:
            self._solved[signature] = (names, self._solve(ordered))
        solved_names, layout = self._solved[signature]
        if layout is None or solved_names == names:
            return layout
        return layout.renamed(solved_names, names)

    def by_class(self, group: Group) -> list[tuple[str, int]]:
        """The group's machines sorted by class, then name: alike groups list their classes in the same order."""
        return sorted(group, key=lambda mc: (self.class_key(*mc), mc[0]))

    def _solve(self, ordered: list[tuple[str, int]]) -> PipelineLayout | None:
        """The DP over machines in the given order (see best); equal signatures give positionally equal layouts,
        as every figure it reads is a function of the position's class."""
        g = _GroupTables.of(self, ordered)
        top = self.pricer.model.num_layers
        best_s, best_path = np.inf, None
        for f, m in enumerate(g.machines):
            cost = self.segment(m, g.counts[m], True, True).costs_s[top] if g.may_start(f) else np.inf
            if cost < best_s:
                best_s, best_path = cost, [(m, top, True, True)]
        states, keys = self._expand(g)
        for sid, key in enumerate(keys):
            f, _, j = key
            ks = g.nexts(key)
            if not ks:
                continue
            totals = states[key].costs_s + g.last_reversed[ks] + (g.hop_s[j, ks] + g.return_s[ks, f])[:, None]
            row, i = np.unravel_index(int(totals.argmin()), totals.shape)
            if totals[row, i] < best_s:
                best_s = float(totals[row, i])
                best_path = self._path(states, keys, sid, int(i), g.machines) + [
                    (g.machines[ks[row]], top - int(i), False, True)]
        if best_path is None:
            return None
        return PipelineLayout(self._stages(best_path, g.counts), float(best_s))

    def _expand(self, g: _GroupTables):
        """All partial pipelines (no last machine yet), in an order where predecessors come first."""
        top = self.pricer.model.num_layers
        states: dict[tuple, _State] = {}
        for f, m in enumerate(g.machines):
            if not g.may_start(f):
                continue
            seg = self.segment(m, g.counts[m], True, False).costs_s
            key = (f, 1 << f if g.exact else None, f)
            states[key] = _State(seg.copy(), np.full(top + 1, -1), np.arange(top + 1))
        keys: list[tuple] = []

        def order(key: tuple) -> tuple:  # machines used (exact) or the last machine's index, then the key
            return (bin(key[1]).count("1") if g.exact else key[2], key)

        frontier = [order(key) for key in states]  # a heap: ~n^2 / 2 states, each adding up to n (no re-sorts)
        heapq.heapify(frontier)
        layers = np.arange(top + 1)
        while frontier:
            key = heapq.heappop(frontier)[1]
            keys.append(key)
            sid, st = len(keys) - 1, states[key]
            ks = g.nexts(key)
            if not ks or not np.isfinite(st.costs_s).any():
                continue
            for k in ks:
                costs, arg = min_plus(st.costs_s, g.middle[k])
                costs += g.hop_s[key[2], k]
                new_key = (key[0], key[1] | (1 << k) if g.exact else None, k)
                if new_key not in states:
                    states[new_key] = _State(np.full(top + 1, np.inf), np.full(top + 1, -1), np.zeros(top + 1, int))
                    heapq.heappush(frontier, order(new_key))
                target = states[new_key]
                better = costs < target.costs_s
                target.costs_s[better] = costs[better]
                target.prev[better] = sid
                target.take[better] = (layers - arg)[better]
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
        stages = [(LayoutStage(machine, s.tp_degree, s.num_layers), s.is_first, s.is_last)
                  for machine, layers, first, last in path
                  for s in self.segment(machine, counts[machine], first, last).stages(layers)]
        return tuple(self._balanced(stages))

    def _balanced(self, stages: list[tuple[LayoutStage, bool, bool]]) -> list[LayoutStage]:
        """The same pipeline with the layers of stages of equal time per layer (alike machines and TP degrees)
        shared in proportion to how many each can hold. Moving layers between such stages leaves the DP's
        objective as it is, so it settles the split among equal-time ones (else float rounding does, as often
        23 | 57 as 40 | 40): the even one leaves the most KV memory on the tightest stage."""
        p, layers = self.pricer, [s.num_layers for s, _, _ in stages]
        alike: dict[float, list[int]] = {}
        for i, (s, _, _) in enumerate(stages):
            alike.setdefault(p.per_layer_s(s.machine, s.tp_degree), []).append(i)
        for idx in (idx for idx in alike.values() if len(idx) > 1):
            caps = [p.max_layers(stages[i][0].machine, stages[i][0].tp_degree, stages[i][1], stages[i][2])
                    for i in idx]
            total, room_in_all = sum(layers[i] for i in idx), sum(caps)
            share = [total * c / room_in_all for c in caps]
            split = [min(c, max(1, int(x))) for x, c in zip(share, caps, strict=True)]
            while sum(split) != total:  # the largest remainders take the layers left (the old split fits, so can)
                grow = sum(split) < total
                room = [k for k in range(len(idx)) if (split[k] < caps[k] if grow else split[k] > 1)]
                k = max(room, key=lambda k: (share[k] - split[k]) * (1 if grow else -1))
                split[k] += 1 if grow else -1
            for i, n in zip(idx, split, strict=True):
                layers[i] = n
        return [replace(s, num_layers=n) for (s, _, _), n in zip(stages, layers, strict=True)]
