"""CPU ranks that share one machine's cores: how much longer a stage step takes among the other busy ranks.

On a GPU machine every rank has a device of its own. CPU ranks (and the coordinator process) are threads on the
same cores: while more threads are busy than the machine has cores, the kernel time-shares the cores among them.
A step is slowed by the larger of two effects:

- fair share: threads get at most the cores that are free, so k threads on L < k free cores take k / L times as
  long (with nothing else busy, L = C);
- the pace of the slowest member: a TP group (or a rank's own OpenMP team) meets at a barrier every few hundred
  microseconds, far shorter than a scheduler time slice, so with k threads of the group on C < k cores the group
  runs in ceil(k / C) waves between barriers and waits for the last one.

Each machine keeps the steps already committed by the event loop, as stretches of time each using some cores (a
group slowed to pace p uses k / p of them). A new step advances through the cores left free, stretch by stretch:
committed steps keep their times, so the total work the cores do is conserved (first come, first served, where
the kernel would share fairly: throughput is the same, single steps' times are spread differently). The CPU time
per output token of the processes beside the ranks (the coordinator; while measuring, the load generator too) is
one more busy thread, and stages of one replica on the machine take turns, paying a measured handoff between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from hexgen.errors import ConfigError

COORDINATOR_THREADS = 1  # one Python process: HTTP server, token routing, detokenization


@dataclass(frozen=True)
class CpuHost:
    """A machine whose ranks are CPU processes on `cores` cores, `threads_per_rank` torch threads each, next to
    processes (the coordinator, a load generator) that spend `coordinator_s_per_token` CPU seconds on each output
    token. A micro-batch handed from one stage to the next on this machine costs `handoff_s` + `handoff_seq_s` per
    sequence (measured by `hexgen profile --model` on a CPU)."""

    cores: int
    threads_per_rank: int
    coordinator_s_per_token: float = 0.0
    handoff_s: float = 0.0
    handoff_seq_s: float = 0.0

    def handoff_time_s(self, num_seqs: int) -> float:
        return self.handoff_s + self.handoff_seq_s * num_seqs

    def __post_init__(self) -> None:
        if self.cores < 1 or self.threads_per_rank < 1 or min(
                self.coordinator_s_per_token, self.handoff_s, self.handoff_seq_s) < 0:
            raise ConfigError(f"a CPU host needs cores >= 1 ({self.cores}), threads per rank >= 1 "
                              f"({self.threads_per_rank}) and coordinator and handoff seconds >= 0 "
                              f"({self.coordinator_s_per_token}, {self.handoff_s}, {self.handoff_seq_s})")


def pace(cores: int, group_threads: int, free_cores: float) -> float:
    """How many times longer a step of a barrier-synchronised group of `group_threads` threads takes with
    `free_cores` of the machine's `cores` left to it: max(1, ceil(k / C), k / free); infinite with none free."""
    if free_cores <= 0:
        return float("inf")
    return max(1.0, float(ceil(group_threads / cores)), group_threads / free_cores)


class SharedCores:
    """The steps committed on one machine's cores; a new step runs on the cores they leave free."""

    def __init__(self, host: CpuHost):
        self.host = host
        self._used: list[tuple[float, float, float]] = []  # (start_s, end_s, cores in use)

    def free_cores_at(self, time_s: float) -> float:
        return self.host.cores - sum(cores for start, end, cores in self._used if start <= time_s < end)

    def run(self, start_s: float, work_s: float, threads: int) -> float:
        """Commit a step of `work_s` seconds (alone on free cores) for `threads` threads starting at `start_s`;
        returns its end. Between two changes of the free cores it advances at their pace (not at all with none)."""
        if work_s <= 0:
            return start_s
        changes = sorted({t for u in self._used for t in u[:2] if t > start_s}) + [float("inf")]
        t, left_s = start_s, work_s
        for change_s in changes:
            slow = pace(self.host.cores, threads, self.free_cores_at(t))
            end_s = t + left_s * slow if slow < float("inf") else float("inf")
            if end_s <= change_s:
                self._used.append((t, end_s, threads / slow))
                return end_s
            if slow < float("inf"):
                left_s -= (change_s - t) / slow
                self._used.append((t, change_s, threads / slow))
            t = change_s
        raise AssertionError("unreachable: the last stretch has every core free")

    def run_stage(self, start_s: float, work_s: float, tp_degree: int) -> float:
        """A stage step: `tp_degree` ranks of `threads_per_rank` threads each."""
        return self.run(start_s, work_s, tp_degree * self.host.threads_per_rank)

    def run_coordinator(self, start_s: float, tokens: int) -> None:
        """The coordinator turns `tokens` returned tokens into text and responses, from `start_s` on."""
        self.run(start_s, tokens * self.host.coordinator_s_per_token, COORDINATOR_THREADS)

    def forget_before(self, now_s: float) -> None:
        """Drop stretches over by `now_s`: every step committed from now on starts at `now_s` or later."""
        self._used = [u for u in self._used if u[1] > now_s]
