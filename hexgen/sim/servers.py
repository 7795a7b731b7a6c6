"""A replica inside the simulator: a queue plus a service model whose step times come from the cost model.

Batching replicas are scheduled by the engine's own continuous-batching Scheduler (torch-free), so the
simulator and the server share one batching policy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hexgen.costmodel import LinearCost
from hexgen.engine.messages import GenerationRequest, SamplingParams, StepPlan
from hexgen.engine.scheduler import Scheduler, SchedulerConfig
from hexgen.sim.workload import Request

UNBOUNDED_CONTEXT = 1 << 30  # the workload, not the simulator, bounds sequence lengths


@dataclass(frozen=True)
class ReplicaModel:
    """A replica's step-time coefficients and how many sequences it batches (1: one request at a time)."""

    cost: LinearCost
    max_batch: int = 1

    def capacity_weight(self, prompt_tokens: float, output_tokens: float) -> float:
        """Requests per second it can finish at full batch, for capacity-weighted dispatch."""
        return self.max_batch / self.cost.request_latency_s(round(prompt_tokens), round(output_tokens))


class SequentialServer:
    """FIFO, one request from prefill to last token, served as one event (the paper's replica)."""

    def __init__(self, cost: LinearCost):
        self._cost = cost
        self._queue: deque[Request] = deque()
        self._current: Request | None = None

    @property
    def outstanding(self) -> int:
        return len(self._queue) + (self._current is not None)

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def start(self, now_s: float) -> float | None:
        """Begin the next request if idle; returns when it finishes (None if nothing was started)."""
        if self._current is not None or not self._queue:
            return None
        self._current = self._queue.popleft()
        return now_s + self._cost.request_latency_s(self._current.prompt_tokens, self._current.output_tokens)

    def finish(self) -> list[Request]:
        done, self._current = [self._current], None
        return done


class BatchingServer:
    """Continuous batching by the engine's own Scheduler: one event per engine step, timed by the cost model."""

    def __init__(self, cost: LinearCost, max_batch: int):
        self._cost = cost
        self._scheduler = Scheduler(SchedulerConfig(max_running_seqs=max_batch, max_context=UNBOUNDED_CONTEXT))
        self._requests: dict[str, Request] = {}
        self._plan: StepPlan | None = None

    @property
    def outstanding(self) -> int:
        return len(self._scheduler.waiting) + len(self._scheduler.running)

    def add(self, request: Request) -> None:
        key = str(request.request_id)
        self._requests[key] = request
        # Token values do not matter to the schedule: only counts do.
        params = SamplingParams(max_new_tokens=request.output_tokens, ignore_eos=True)
        self._scheduler.add(GenerationRequest(key, (0,) * request.prompt_tokens, params))

    def start(self, now_s: float) -> float | None:
        if self._plan is not None:
            return None
        self._plan = self._scheduler.schedule()
        if self._plan is None:
            return None
        return now_s + step_time_s(self._cost, self._plan, self._decoding(self._plan))

    def _decoding(self, plan: StepPlan) -> list[bool]:
        prompt_len = {seq.slot: seq.prompt_len for seq in self._scheduler.running.values()}
        return [start >= prompt_len[slot] for slot, start in zip(plan.slots, plan.starts, strict=True)]

    def finish(self) -> list[Request]:
        assert self._plan is not None
        events = self._scheduler.update(self._plan, [0] * self._plan.num_sampled)
        self._plan = None
        return [self._requests.pop(e.request_id) for e in events if e.finish_reason is not None]


def step_time_s(cost: LinearCost, plan: StepPlan, decoding: list[bool]) -> float:
    """Seconds of one engine step: prompt tokens being prefilled plus one token for each decoding sequence.

    A step that does both scans the weights once, so it pays the larger of the two fixed costs.
    """
    prefill_tokens = sum(n for n, d in zip(plan.lengths, decoding, strict=True) if not d)
    decode_seqs = sum(decoding)
    context = sum(start + 1 for start, d in zip(plan.starts, decoding, strict=True) if d)
    fixed = max(cost.prefill_fixed_s if prefill_tokens else 0.0, cost.decode_fixed_s if decode_seqs else 0.0)
    return (fixed + cost.prefill_per_token_s * prefill_tokens + cost.decode_per_seq_s * decode_seqs
            + cost.decode_per_ctx_token_s * context)


def make_server(model: ReplicaModel) -> SequentialServer | BatchingServer:
    return SequentialServer(model.cost) if model.max_batch == 1 else BatchingServer(model.cost, model.max_batch)
