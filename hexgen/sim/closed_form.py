"""Latencies of one-request-at-a-time replicas under round-robin dispatch, in closed form (the search's inner loop).

Round-robin sends the j-th arrival to replica j mod k whatever the replicas' state, so every replica is an
independent FIFO queue. Its finish times follow Lindley's recursion f_j = max(a_j, f_{j-1}) + s_j, which unrolls
to f_j = S_j + max_{m <= j}(a_m - S_{m-1}) with S the running sum of service times: a cumulative sum and a
cumulative max per replica. Equals sim.simulator.simulate with batch-1 replicas and RoundRobin (tested).
"""

from __future__ import annotations

import numpy as np

from hexgen.costmodel import LinearCost
from hexgen.sim.workload import Request


class RoundRobinQueues:
    """A fixed request stream, ready to be replayed on any list of replica step-time models."""

    def __init__(self, requests: list[Request]):
        ordered = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
        self.arrival_s = np.array([r.arrival_s for r in ordered])
        self.prompt_tokens = np.array([r.prompt_tokens for r in ordered], dtype=np.int64)
        self.output_tokens = np.array([r.output_tokens for r in ordered], dtype=np.int64)

    def latencies_s(self, costs: list[LinearCost]) -> np.ndarray:
        """Each request's latency (arrival order) when replica i (in rotation order) has step times costs[i]."""
        out = np.empty(len(self.arrival_s))
        for i, cost in enumerate(costs):
            rows = slice(i, None, len(costs))
            arrival = self.arrival_s[rows]
            service = cost.request_latency_s(self.prompt_tokens[rows], self.output_tokens[rows])
            done_work = np.cumsum(service)
            finish = done_work + np.maximum.accumulate(arrival - (done_work - service))
            out[rows] = finish - arrival
        return out
