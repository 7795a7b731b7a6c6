"""A replica inside the simulator: a queue plus a service model whose step times come from the cost model.

Batching replicas are scheduled by the engine's own continuous-batching Scheduler over a paged KV pool
(torch-free), so the simulator and the server share one batching policy. A replica of S stages keeps up to S
micro-batches in flight; each stage works on them in order, one at a time. Stages on a machine whose CPU ranks
share its cores (hexgen/sim/host.py) take longer while other ranks there are busy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hexgen.costmodel import LinearCost, ReplicaCost
from hexgen.engine.block_manager import blocks_for
from hexgen.engine.messages import GenerationRequest, SamplingParams, StepPlan
from hexgen.engine.scheduler import Scheduler, SchedulerConfig
from hexgen.sim.host import SharedCores
from hexgen.sim.workload import Request

UNBOUNDED_CONTEXT = 1 << 30  # the workload and the KV pool, not the simulator, bound sequence lengths


@dataclass(frozen=True)
class ReplicaModel:
    """A replica's step-time model, how many sequences it batches (1: one request at a time, the paper's) and the
    (machine, TP degree) of each stage, which the simulator needs only where ranks share a machine's cores."""

    cost: ReplicaCost
    max_batch: int = 1
    placement: tuple[tuple[str, int], ...] = ()

    def capacity_weight(self, prompt_tokens: float, output_tokens: float) -> float:
        """Requests per second it can finish at full batch (KV pool permitting), for capacity-weighted dispatch."""
        p, o = round(prompt_tokens), round(output_tokens)
        if self.max_batch == 1:
            return 1.0 / self.cost.request_latency_s(p, o)
        return self.cost.full_load_rps(self.max_batch, p, o)


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

    def start(self, now_s: float) -> list[float]:
        """Begin the next request if idle; returns when what was started finishes."""
        if self._current is not None or not self._queue:
            return []
        self._current = self._queue.popleft()
        return [now_s + self._cost.request_latency_s(self._current.prompt_tokens, self._current.output_tokens)]

    def finish(self) -> list[Request]:
        done, self._current = [self._current], None
        return done


class BatchingServer:
    """Continuous batching by the engine's Scheduler: one event per micro-batch, each stage in turn.

    As the engine's driver does, it keeps one micro-batch in flight per stage with devices of its own and one per
    shared CPU machine (launch/spec.py:pipeline_depth), each taking `Scheduler.micro_batch_limit(depth)`
    sequences. `cores[j]` is the shared machine stage j runs on (None: a device of its own) and `tp_degrees[j]`
    its ranks; the driver's machine (stage 0) also runs the coordinator.
    """

    def __init__(self, cost: ReplicaCost, max_batch: int, pool_blocks: int,
                 cores: tuple[SharedCores | None, ...] = (), tp_degrees: tuple[int, ...] = ()):
        self._cost = cost
        self._cores = cores or (None,) * cost.num_stages
        self._tp_degrees = tp_degrees or (1,) * cost.num_stages
        shared_machines = {c for c in self._cores if c is not None}
        self._depth = sum(c is None for c in self._cores) + len(shared_machines)
        config = SchedulerConfig(max_running_seqs=max_batch, max_context=UNBOUNDED_CONTEXT,
                                 block_size=cost.kv_block_tokens, num_kv_blocks=pool_blocks)
        self._scheduler = Scheduler(config)
        self._requests: dict[str, Request] = {}
        self._in_flight: deque[StepPlan] = deque()
        self._stage_free_s = [0.0] * cost.num_stages

    @property
    def outstanding(self) -> int:
        return len(self._requests)

    def add(self, request: Request) -> None:
        key = str(request.request_id)
        self._requests[key] = request
        # Token values do not matter to the schedule: only counts do.
        params = SamplingParams(max_new_tokens=request.output_tokens, ignore_eos=True, seed=0)
        self._scheduler.add(GenerationRequest(key, (0,) * request.prompt_tokens, params))

    def start(self, now_s: float) -> list[float]:
        """Launch micro-batches while fewer than `depth` are in flight; returns when each comes back."""
        ends = []
        for shared in set(self._cores) - {None}:
            shared.forget_before(now_s)
        while len(self._in_flight) < self._depth:
            plan = self._scheduler.schedule(self._scheduler.micro_batch_limit(self._depth))
            if plan is None:
                break
            self._in_flight.append(plan)
            ends.append(self._pass_through(now_s, plan))
        return ends

    def _pass_through(self, now_s: float, plan: StepPlan) -> float:
        """Each stage starts the micro-batch once it has arrived and the stage is free; then the hop onward."""
        t = now_s
        for j, stage in enumerate(self._cost.stages):
            t = self._run_stage(j, max(t, self._stage_free_s[j]), step_time_s(stage, plan))
            self._stage_free_s[j] = t
            if j < len(self._cost.hops):
                t += step_time_s(self._cost.hops[j], plan)
            shared = self._cores[j]
            if shared is not None and j + 1 < len(self._cores) and shared is self._cores[j + 1]:  # taking turns
                t += shared.host.handoff_time_s(plan.num_seqs)
        t += step_time_s(self._cost.token_return, plan)
        if self._cores[0] is not None:
            self._cores[0].run_coordinator(t, plan.num_sampled)
        return t

    def _run_stage(self, j: int, start_s: float, work_s: float) -> float:
        shared = self._cores[j]
        return start_s + work_s if shared is None else shared.run_stage(start_s, work_s, self._tp_degrees[j])

    def finish(self) -> list[Request]:
        """The oldest micro-batch came back (stages are first in, first out)."""
        plan = self._in_flight.popleft()
        events = self._scheduler.update(plan, [0] * plan.num_sampled)
        return [self._requests.pop(e.request_id) for e in events if e.finish_reason is not None]


def step_time_s(cost: LinearCost, plan: StepPlan) -> float:
    """Seconds of one step of a stage (or hop): prompt chunks being prefilled plus one token of each decoding
    sequence (an entry of one token that ends its sequence's known tokens), which attends over start + 1 tokens.

    A step that does both scans the weights once, so it pays the larger of the two fixed costs.
    """
    prefill_tokens = decode_seqs = context = 0
    for start, length, sample in zip(plan.starts, plan.lengths, plan.sample, strict=True):
        if length == 1 and sample and start > 0:
            decode_seqs += 1
            context += start + 1
        else:
            prefill_tokens += length
    fixed = max(cost.prefill_fixed_s if prefill_tokens else 0.0, cost.decode_fixed_s if decode_seqs else 0.0)
    return (fixed + cost.prefill_per_token_s * prefill_tokens + cost.decode_per_seq_s * decode_seqs
            + cost.decode_per_ctx_token_s * context)


def make_server(model: ReplicaModel, longest_request_tokens: int, shared: dict[str, SharedCores] | None = None,
                ) -> SequentialServer | BatchingServer:
    """The paper's one-at-a-time replica for max_batch 1, else the engine's batching; an unsized KV pool gets
    room for max_batch of the longest requests, so only the batch limit binds. `shared`: the machines whose CPU
    ranks share cores (batching replicas only: the engine we run)."""
    if model.max_batch == 1:
        return SequentialServer(model.cost.sequential)
    pool = model.cost.kv_blocks
    if pool is None:
        # the scheduler admits a sequence only while a block per running sequence stays free: one spare each
        pool = model.max_batch * (blocks_for(longest_request_tokens, model.cost.kv_block_tokens) + 1)
    if not shared or not model.placement:
        return BatchingServer(model.cost, model.max_batch, pool)
    cores = tuple(shared.get(machine) for machine, _ in model.placement)
    return BatchingServer(model.cost, model.max_batch, pool, cores, tuple(tp for _, tp in model.placement))
