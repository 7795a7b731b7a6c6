"""The event loop: arrivals are dispatched to replicas; each replica's steps finish at cost-model times."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from hexgen.dispatch import DispatchPolicy, ReplicaState
from hexgen.sim.host import CpuHost, SharedCores
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


def simulate(
    replicas: list[ReplicaModel], requests: list[Request], policy: DispatchPolicy,
    follow_up: Callable[[Completion], Request | None] | None = None, hosts: dict[str, CpuHost] | None = None,
    weights: list[float] | None = None,
) -> list[Completion]:
    """Run every request to completion; returns completions in finishing order.

    `follow_up` turns a completion into the next request of its client (closed-loop load), or None.
    `hosts`: machines whose CPU ranks (of every replica) share cores; other machines have a device per rank.
    `weights`: the replicas' capacity weights for dispatch, as a server was given them (default: each model's
    requests per second at full batch).
    Events at equal times: step completions are handled before arrivals, so a freed replica counts as free.
    """
    if not replicas:
        return []
    longest = max((r.prompt_tokens + r.output_tokens for r in requests), default=1)
    shared = {name: SharedCores(host) for name, host in (hosts or {}).items()}
    servers = [make_server(r, longest, shared) for r in replicas]
    mean_prompt = sum(r.prompt_tokens for r in requests) / max(len(requests), 1)
    mean_output = sum(r.output_tokens for r in requests) / max(len(requests), 1)
    if weights is None:
        weights = [r.capacity_weight(mean_prompt, mean_output) for r in replicas]
    states = [ReplicaState(0, True, w) for w in weights]
    busy: list[tuple[float, int]] = []  # (finish time of a step in flight, replica index)
    done: list[Completion] = []
    arrivals = [(r.arrival_s, r.request_id, r) for r in requests]
    heapq.heapify(arrivals)
    while arrivals or busy:
        if busy and (not arrivals or busy[0][0] <= arrivals[0][0]):
            now, i = heapq.heappop(busy)
            for req in servers[i].finish():
                done.append(Completion(req, i, now))
                states[i].outstanding -= 1
                nxt = follow_up(done[-1]) if follow_up else None
                if nxt is not None:
                    heapq.heappush(arrivals, (nxt.arrival_s, nxt.request_id, nxt))
        else:
            now, _, req = heapq.heappop(arrivals)
            i = policy.choose(states)
            states[i].outstanding += 1
            servers[i].add(req)
        for end in servers[i].start(now):
            heapq.heappush(busy, (end, i))
    return done


def simulate_streams(
    replicas: list[ReplicaModel], streams: int, num_requests: int, prompt_tokens: int, output_tokens: int,
    policy: DispatchPolicy, hosts: dict[str, CpuHost] | None = None, weights: list[float] | None = None,
) -> list[Completion]:
    """Closed-loop load, as `hexgen bench serve --concurrency`: `streams` clients start at time 0 and each sends
    its next request the moment its previous one finishes, until `num_requests` have been sent."""
    first = [Request(i, 0.0, prompt_tokens, output_tokens) for i in range(min(streams, num_requests))]
    sent = len(first)

    def next_request(done: Completion) -> Request | None:
        nonlocal sent
        if sent >= num_requests:
            return None
        sent += 1
        return Request(sent - 1, done.finish_s, prompt_tokens, output_tokens)

    return simulate(replicas, first, policy, next_request, hosts, weights)
