"""CPU ranks that share one machine's cores: how much longer a stage step takes among the other busy ranks.

On a GPU machine every rank has a device of its own. CPU ranks (and the coordinator process) are threads on the
same cores: while more threads are busy than the machine has cores, the kernel time-shares the cores among them.
Two effects follow, and a step's slowdown is the larger of them:

- fair share: with D threads busy on C cores, each gets C / D of a core, so work takes D / C times as long;
- the pace of the slowest member: a TP group (or a rank's own OpenMP team) meets at a barrier every few hundred
  microseconds, far shorter than a scheduler time slice, so with k threads of the group on C < k cores the group
  runs in ceil(k / C) waves between barriers and waits for the last one.

Each machine keeps the busy intervals already committed by the event loop. A new step advances through them at
the pace each moment allows (slowed while the committed ones overlap it, full speed once they end); committed
intervals keep their times, so the newcomer absorbs the contention and the cores' total work is conserved. The
coordinator's CPU time per output token is one more busy thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from hexgen.errors import ConfigError

COORDINATOR_THREADS = 1  # one Python process: HTTP server, token routing, detokenization


@dataclass(frozen=True)
class CpuHost:
    """A machine whose ranks are CPU processes on `cores` cores, `threads_per_rank` torch threads each, next to
    a coordinator that spends `coordinator_s_per_token` CPU seconds on each output token."""

    cores: int
    threads_per_rank: int
    coordinator_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.cores < 1 or self.threads_per_rank < 1 or self.coordinator_s_per_token < 0:
            raise ConfigError(f"a CPU host needs cores >= 1 ({self.cores}), threads per rank >= 1 "
                              f"({self.threads_per_rank}) and coordinator seconds per token >= 0 "
                              f"({self.coordinator_s_per_token})")


def engine_threads_per_rank(cores: int, ranks: int) -> int:
    """Torch threads of each CPU rank when `ranks` ranks run on `cores` cores: the machine's cores split evenly,
    at least one (the rule `hexgen serve` applies to local CPU ranks)."""
    return max(1, cores // ranks)


def slowdown(cores: int, group_threads: int, other_busy_threads: int) -> float:
    """How many times longer a step of a barrier-synchronised group of `group_threads` threads takes while
    `other_busy_threads` other threads are busy on the machine: max(1, ceil(k / C), (k + others) / C)."""
    return max(1.0, float(ceil(group_threads / cores)), (group_threads + other_busy_threads) / cores)


class SharedCores:
    """The busy intervals committed on one machine's cores; a step starting among them is slowed accordingly."""

    def __init__(self, host: CpuHost):
        self.host = host
        self._busy: list[tuple[float, float, int]] = []  # (start_s, end_s, threads)

    def busy_threads_at(self, time_s: float) -> int:
        return sum(threads for start, end, threads in self._busy if start <= time_s < end)

    def run(self, start_s: float, work_s: float, threads: int) -> float:
        """Commit a step of `work_s` seconds (alone on free cores) for `threads` threads starting at `start_s`;
        returns its end, each stretch between two changes of the busy threads slowed by their slowdown."""
        if work_s <= 0:
            return start_s
        changes = sorted({t for b in self._busy for t in b[:2] if t > start_s})
        t, left_s = start_s, work_s
        for change_s in changes:
            pace = slowdown(self.host.cores, threads, self.busy_threads_at(t))
            if left_s * pace <= change_s - t:
                break
            left_s -= (change_s - t) / pace
            t = change_s
        end_s = t + left_s * slowdown(self.host.cores, threads, self.busy_threads_at(t))
        self._busy.append((start_s, end_s, threads))
        return end_s

    def run_stage(self, start_s: float, work_s: float, tp_degree: int) -> float:
        """A stage step: `tp_degree` ranks of `threads_per_rank` threads each."""
        return self.run(start_s, work_s, tp_degree * self.host.threads_per_rank)

    def run_coordinator(self, start_s: float, tokens: int) -> None:
        """The coordinator turns `tokens` returned tokens into text and responses, from `start_s` on."""
        self.run(start_s, tokens * self.host.coordinator_s_per_token, COORDINATOR_THREADS)

    def forget_before(self, now_s: float) -> None:
        """Drop intervals over by `now_s`: every step committed from now on starts at `now_s` or later."""
        self._busy = [b for b in self._busy if b[1] > now_s]
