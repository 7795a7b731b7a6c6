"""The event loop: arrivals are dispatched to replicas; each replica's steps finish at cost-model times."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from hexgen.dispatch import DispatchPolicy, ReplicaState
from hexgen.sim.servers import ReplicaModel, make_server
from hexgen.sim.workload import Request


@dataclass(frozen=True)
class Completion:
    request: Request
    replica: int
    finish_s: float

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.request.arrival_s


def simulate(replicas: list[ReplicaModel], requests: list[Request], policy: DispatchPolicy) -> list[Completion]:
    """Run every request to completion; returns completions in finishing order.

    Events at equal times: step completions are handled before arrivals, so a freed replica counts as free.
    """
    if not replicas:
        return []
    longest = max((r.prompt_tokens + r.output_tokens for r in requests), default=1)
    servers = [make_server(r, longest) for r in replicas]
    mean_prompt = sum(r.prompt_tokens for r in requests) / max(len(requests), 1)
    mean_output = sum(r.output_tokens for r in requests) / max(len(requests), 1)
    states = [ReplicaState(0, True, r.capacity_weight(mean_prompt, mean_output)) for r in replicas]
    busy: list[tuple[float, int]] = []  # (finish time of the running step, replica index)
    done: list[Completion] = []
    arrivals = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    a = 0
    while a < len(arrivals) or busy:
        if busy and (a == len(arrivals) or busy[0][0] <= arrivals[a].arrival_s):
            now, i = heapq.heappop(busy)
            for req in servers[i].finish():
                done.append(Completion(req, i, now))
                states[i].outstanding -= 1
        else:
            req, now = arrivals[a], arrivals[a].arrival_s
            a += 1
            i = policy.choose(states)
            states[i].outstanding += 1
            servers[i].add(req)
        for end in servers[i].start(now):
            heapq.heappush(busy, (end, i))
    return done
