"""A replica inside the simulator: a queue plus a service model whose step times come from the cost model."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hexgen.costmodel import LinearCost
from hexgen.sim.batching import ContinuousBatcher, Sequence, Step
from hexgen.sim.workload import Request


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
    """Continuous batching: one event per engine step (prefill of new sequences or a decode token for all)."""

    def __init__(self, cost: LinearCost, max_batch: int):
        self._cost = cost
        self._batcher = ContinuousBatcher(max_batch)
        self._requests: dict[int, Request] = {}
        self._step: Step | None = None

    @property
    def outstanding(self) -> int:
        return self._batcher.outstanding

    def add(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self._batcher.add(Sequence(request.request_id, request.prompt_tokens, request.output_tokens))

    def start(self, now_s: float) -> float | None:
        if self._step is not None:
            return None
        self._step = self._batcher.next_step()
        if self._step is None:
            return None
        return now_s + step_time_s(self._cost, self._step)

    def finish(self) -> list[Request]:
        done = self._batcher.complete(self._step)
        self._step = None
        return [self._requests.pop(s.request_id) for s in done]


def step_time_s(cost: LinearCost, step: Step) -> float:
    """Seconds of one engine step: a batched prefill, or a decode over every running sequence's context."""
    if step.is_prefill:
        return cost.prefill_s(step.prefill_tokens)
    return cost.decode_step_s(len(step.sequences), step.context_tokens)


def make_server(model: ReplicaModel) -> SequentialServer | BatchingServer:
    return SequentialServer(model.cost) if model.max_batch == 1 else BatchingServer(model.cost, model.max_batch)
