"""Replica speeds measured at start-up, for plans that carry no predictions (a hand-written plan, or `hexgen
serve`'s default local plan). Such a plan is dispatched least-outstanding, and a tie (every replica idle, as for
a lone request) goes to the replica with the highest capacity weight: without a measurement every replica weighs
1 and the tie goes to the first one, however slow (the default plan's TP 3 -> TP 1 replica on the 2-core EPYC:
6 tokens/s where its one-process replica makes 22).

Each replica in turn decodes one short probe request alone (one at a time, so replicas sharing a machine do not
slow each other while measured); its weight is the decode tokens per second it reached, the speed a lone request
gets. It is not a capacity under load: weighting load by it (capacity-weighted dispatch) served 16 streams on
those two replicas, which share 2 cores, at 72 tok/s against least-outstanding's 103 (medians of three rounds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from hexgen.dispatch import ReplicaState
from hexgen.engine.messages import GenerationRequest, SamplingParams, TokenEvent

PROBE_PROMPT = tuple(range(1, 9))  # 8 token ids valid in any vocabulary
PROBE_NEW_TOKENS = 8
PROBE_TIMEOUT_S = 300.0


class Probed(Protocol):
    index: int
    state: ReplicaState

    async def submit(self, request: GenerationRequest) -> asyncio.Queue: ...
    async def release(self, request_id: str, abort: bool) -> None: ...


def needs_measured_speeds(predicted: Sequence[dict], dispatch: str) -> bool:
    """Several replicas, none predicted by the planner, dispatched by a policy that reads their weights."""
    return dispatch in ("least-outstanding", "capacity-weighted") and len(predicted) > 1 and not any(
        p.get("throughput_rps") or p.get("latency_s") for p in predicted)


async def decode_tokens_per_s(replica: Probed, clock: Callable[[], float] = time.monotonic) -> float | None:
    """Decode tokens per second of one probe request on `replica`, timed from its first token (after the prefill)
    to its last; None if the replica rejected it or went down."""
    request = GenerationRequest(f"capacity-probe-{replica.index}", PROBE_PROMPT,
                                SamplingParams(max_new_tokens=PROBE_NEW_TOKENS, ignore_eos=True))
    queue = await replica.submit(request)
    first_s = last_s = None
    count = 0
    try:
        while True:
            item = await asyncio.wait_for(queue.get(), PROBE_TIMEOUT_S)
            if not isinstance(item, TokenEvent):
                return None
            count += 1
            last_s = clock()
            first_s = last_s if first_s is None else first_s
            if item.finish_reason is not None:
                break
    finally:
        await replica.release(request.request_id, abort=False)
    return (count - 1) / (last_s - first_s) if count > 1 and last_s > first_s else None


async def measure_speeds(replicas: Sequence[Probed], clock: Callable[[], float] = time.monotonic) -> dict[int, float]:
    """Probe each replica in turn and set its capacity weight to the decode tokens per second measured (a replica
    whose probe failed keeps its weight); returns the speeds measured, by replica index."""
    measured = {}
    for replica in replicas:
        speed = await decode_tokens_per_s(replica, clock)
        if speed is not None:
            replica.state.capacity_weight = measured[replica.index] = speed
    return measured
