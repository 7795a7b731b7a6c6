"""Best stages on one machine for every layer count: TP degrees, layer split, and which stage is first/last.

Within one machine all links are equal, so the order of its stages does not change their time; what matters
is the multiset of TP degrees, the layer split, and which stage (if any) holds the embedding (pipeline's
first stage, no input broadcast) or the LM head (pipeline's last stage). Time is linear in layers, so for a
fixed multiset the best split gives each stage one layer and then fills the cheapest per-layer stages up to
their memory caps (a greedy fill that is optimal for a linear objective with box constraints).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hexgen.errors import ConfigError
from hexgen.planner.pricing import StagePricer


@dataclass(frozen=True)
class SegmentStage:
    tp_degree: int
    num_layers: int
    is_first: bool
    is_last: bool


@dataclass(frozen=True)
class _Candidate:
    tp_degrees: tuple[int, ...]  # in pipeline order on this machine
    firsts: tuple[bool, ...]
    lasts: tuple[bool, ...]


# Multisets of TP degrees one machine's SegmentTable may enumerate: about 1-2 ms each (2-core Xeon), so ~5-10 s. A
# machine of 32 GPUs and TP degrees 1, 2, 4, 8 has 1,624; 64 such GPUs 17,360; 128 CPU slots of a model whose TP
# degrees are 1 and 3, 2,837.
MAX_TP_MULTISETS = 5_000


def count_tp_multisets(gpu_count: int, degrees: list[int]) -> int:
    """How many multisets tp_multisets would list, without listing them (coin-change counting)."""
    ways = [1] + [0] * gpu_count  # ways[s]: multisets summing to exactly s
    for d in set(degrees):
        for total in range(d, gpu_count + 1):
            ways[total] += ways[total - d]
    return sum(ways) - 1


def tp_multisets(gpu_count: int, degrees: list[int]) -> list[tuple[int, ...]]:
    """Non-empty multisets of TP degrees (descending tuples) whose sum is at most `gpu_count`, in depth-first order
    (larger degrees first); an explicit stack, as a machine of many slots nests as deep as its GPU count."""
    out: list[tuple[int, ...]] = []
    descending = sorted(set(degrees), reverse=True)
    stack: list[tuple[tuple[int, ...], int]] = [((), gpu_count)]
    while stack:
        prefix, left = stack.pop()
        if prefix:
            out.append(prefix)
        largest = min(left, prefix[-1]) if prefix else left
        stack.extend((prefix + (d,), left - d) for d in reversed(descending) if d <= largest)
    return out


def _candidates(multiset: tuple[int, ...], first: bool, last: bool) -> list[_Candidate]:
    """Orders that matter: which TP value carries the embedding / head (other positions are interchangeable)."""
    orders: set[tuple[int, ...]] = set()
    if len(multiset) == 1:
        orders.add(multiset)
    for f in sorted(set(multiset)) if first else [None]:
        rest = list(multiset)
        if f is not None:
            rest.remove(f)
        for lt in sorted(set(rest)) if last and rest else [None]:
            middle = list(rest)
            if lt is not None:
                middle.remove(lt)
            if len(multiset) > 1:
                orders.add(tuple(([f] if f is not None else []) + sorted(middle, reverse=True)
                                 + ([lt] if lt is not None else [])))
    out = []
    for order in sorted(orders):
        n = len(order)
        firsts = tuple(first and i == 0 for i in range(n))
        out.append(_Candidate(order, firsts, tuple(last and i == n - 1 for i in range(n))))
    return out


class SegmentTable:
    """seg[l]: least request latency of `l` layers placed on up to `gpu_count` GPUs of one machine."""

    def __init__(self, pricer: StagePricer, machine: str, gpu_count: int, first: bool, last: bool):
        num_layers = pricer.model.num_layers
        self.costs_s = np.full(num_layers + 1, np.inf)
        self._best: list[_Candidate | None] = [None] * (num_layers + 1)
        self._pricer, self._machine = pricer, machine
        degrees = pricer.tp_degrees(machine)
        layouts = count_tp_multisets(gpu_count, degrees)
        if layouts > MAX_TP_MULTISETS:
            raise ConfigError(
                f"machine {machine!r}: its {gpu_count} GPUs form {layouts:,} different sets of TP groups (degrees "
                f"{', '.join(map(str, degrees))}), more than the planner enumerates ({MAX_TP_MULTISETS:,}); describe "
                "it as several machines of fewer GPUs (with fast network.links between them), or give it fewer slots"
            )
        for multiset in tp_multisets(gpu_count, degrees):
            for cand in _candidates(multiset, first, last):
                self._consider(cand)

    def _stage_arrays(self, cand: _Candidate) -> tuple[np.ndarray, np.ndarray, float]:
        p, m = self._pricer, self._machine
        taus = np.array([p.per_layer_s(m, t) for t in cand.tp_degrees])
        roles = list(zip(cand.tp_degrees, cand.firsts, cand.lasts, strict=True))
        caps = np.array([p.max_layers(m, t, f, lt) for t, f, lt in roles])
        extras = sum(p.stage_extra_s(m, t, f, lt) for t, f, lt in roles)
        extras += (len(cand.tp_degrees) - 1) * p.hop_s(m, m)
        if cand.firsts[0] and cand.lasts[-1] and len(cand.tp_degrees) > 1:
            extras += p.token_return_s(m, m)
        return taus, caps, extras

    def _fill(self, cand: _Candidate) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        taus, caps, extras = self._stage_arrays(cand)
        k = len(taus)
        owners = np.repeat(np.arange(k), np.maximum(caps - 1, 0))
        order = np.argsort(taus[owners], kind="stable")
        marginal = taus[owners][order]
        totals = extras + taus.sum() + np.concatenate([[0.0], np.cumsum(marginal)])
        return k, totals, owners[order], caps

    def _consider(self, cand: _Candidate) -> None:
        k, totals, _, caps = self._fill(cand)
        if caps.min() < 1 or k > len(self.costs_s) - 1:
            return
        hi = min(len(self.costs_s), k + len(totals))
        window = totals[: hi - k]
        better = window < self.costs_s[k:hi]
        self.costs_s[k:hi] = np.where(better, window, self.costs_s[k:hi])
        for idx in np.nonzero(better)[0]:
            self._best[k + idx] = cand

    def stages(self, num_layers: int) -> list[SegmentStage]:
        """The stages that achieve costs_s[num_layers], in pipeline order."""
        cand = self._best[num_layers]
        if cand is None:
            raise ValueError(f"no segment of {num_layers} layers on {self._machine}")
        k, _, owners, _ = self._fill(cand)
        layers = np.ones(k, dtype=int) + np.bincount(owners[: num_layers - k], minlength=k)
        roles = zip(cand.tp_degrees, layers, cand.firsts, cand.lasts, strict=True)
        return [SegmentStage(t, int(n), f, lt) for t, n, f, lt in roles]
