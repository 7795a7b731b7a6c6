"""Latencies of batching replicas under Poisson load, estimated in closed form (the plan search's inner loop).

The event simulator runs the engine's scheduler step by step, too slow to score thousands of candidate plans.
This estimate treats each replica as a pool of `running` slots (its batch limit, or fewer if its KV pool holds
fewer sequences) fed by its share of the arrivals: a request that finds k others decodes alongside them, so it
takes T(k+1) = prefill + (output-1) x the pipelined token time at k+1 sequences, stretched by the time the
prompts of later arrivals take from those decode steps (1 / (1 - rate x prompt work)); the number in a replica is
Poisson with mean a = rate x T(a) (the infinite-server law, solved by fixed point); beyond the slots, a
request waits for (k - slots + 1) completions at the replica's full-load rate. A replica offered more than it
can finish falls behind linearly over the stream. Tested against the event simulator in tests/scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from hexgen.costmodel import ReplicaCost

POINTS = 400  # latency samples describing a whole plan (split over replicas by their share of requests)


@dataclass(frozen=True)
class BatchingLoad:
    """What every replica serves: the batch limit, the (fixed) request shape and the whole plan's stream."""

    max_batch: int
    prompt_tokens: int
    output_tokens: int
    rate_rps: float
    num_requests: int


@cache
def service_table_s(cost: ReplicaCost, load: BatchingLoad) -> np.ndarray:
    """T[n-1]: one request's time in a replica that runs n sequences (itself included), n = 1 .. its slots."""
    p, o = load.prompt_tokens, load.output_tokens
    slots = max(1, cost.max_running(load.max_batch, p, o))
    decode = np.array([cost.decode_token_s(n, p + o / 2) for n in range(1, slots + 1)])
    return cost.sequential.prefill_s(p) + (o - 1) * decode


def replica_latencies_s(cost: ReplicaCost, share: float, load: BatchingLoad, points: int) -> np.ndarray:
    """`points` latencies spread like one replica's (evenly spaced quantiles) when it gets `share` of the stream."""
    rate = share * load.rate_rps
    full_rps = _capacity_rps(cost, load)
    slots = len(service_table_s(cost, load))
    stolen = rate * cost.prompt_delay_s(slots, load.prompt_tokens, load.output_tokens)  # the others' prompts' time
    if rate >= full_rps or stolen >= 1:
        # Falls behind: a full batch turns over at capacity, so each request spends slots / capacity in it (Little),
        # and the j-th of its n requests also waits j x (1/capacity - 1/rate) for a slot.
        n = max(1, round(share * load.num_requests))
        lag_s = (1 / full_rps - 1 / rate) * n
        return slots / full_rps + lag_s * (np.arange(points) + 0.5) / points
    table = service_table_s(cost, load) / (1 - stolen)
    offered = _offered_load(table, rate)
    top = int(offered + 8 * math.sqrt(offered + 1) + slots + 2)
    k = np.arange(top + 1)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, top + 1)))])
    pmf = np.exp(k * math.log(max(offered, 1e-12)) - offered - log_factorial)
    latency = table[np.minimum(k, slots - 1)] + np.maximum(k - slots + 1, 0) / full_rps
    cdf = np.cumsum(pmf) / pmf.sum()
    picks = np.searchsorted(cdf, (np.arange(points) + 0.5) / points)
    return latency[np.minimum(picks, top)]


@cache
def _capacity_rps(cost: ReplicaCost, load: BatchingLoad) -> float:
    p, o = load.prompt_tokens, load.output_tokens
    return cost.full_load_rps(load.max_batch, p, o)


def _offered_load(table: np.ndarray, rate: float) -> float:
    """Mean sequences in the replica: a = rate x T(a), by fixed-point iteration from one."""
    offered = rate * table[0]
    for _ in range(20):
        new = rate * table[min(len(table), round(offered) + 1) - 1]
        if abs(new - offered) < 1e-3 * (offered + 1e-9):
            return new
        offered = new
    return offered


def plan_latencies_s(costs: list[ReplicaCost], shares: list[float], load: BatchingLoad) -> np.ndarray:
    """Latencies describing the whole plan: each replica contributes points in proportion to its share."""
    parts = [replica_latencies_s(c, s, load, max(1, round(s * POINTS))) for c, s in zip(costs, shares, strict=True)]
    return np.concatenate(parts) if parts else np.array([])


def dispatch_shares(costs: list[ReplicaCost], dispatch: str, load: BatchingLoad) -> list[float]:
    """Each replica's share of requests: equal under round-robin, else in proportion to full-load capacity
    (capacity-weighted dispatch; least-outstanding settles close to it under load)."""
    if dispatch == "round-robin":
        return [1 / len(costs)] * len(costs)
    caps = [_capacity_rps(c, load) for c in costs]
    return [c / sum(caps) for c in caps]
