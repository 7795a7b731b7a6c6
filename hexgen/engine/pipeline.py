"""Everything a replica's ranks say to each other per step, in one place.

A step (micro-batch) travels down the pipeline with its plan; nothing goes to every rank at once:
- the driver (stage 0's leader) broadcasts the plan inside stage 0's TP group;
- stage s's leader sends the plan (one message of PLAN_BYTES over the gloo control group, the rest of a larger
  plan in a second) and the activations [T, H] (over the default group: NCCL on GPUs) to stage s+1's leader, which
  broadcasts both inside its TP group. That leader always has its next plan's receive posted (PlanInbox) before it
  computes, so the plan is taken in while it works: a gloo receive posted only once the data has arrived costs a
  thread hand-off (1.7 ms each, measured on the 2-core EPYC with both cores busy);
- the last stage's leader sends the step's samples back to the driver, and only to it: the token ids
  [num_sampled], or where a request asked for log-probabilities a float64 table of ids and log-probabilities
  (sampler.sample_table) whose width both ends derive from the plan.
Sends are asynchronous, so stage s works on the next micro-batch while stage s+1 runs this one; each rank
handles micro-batches in the order they arrive, which keeps every stage's KV writes in step order. Ranks of
one replica trust each other: plans are pickled between them (torch.distributed is not exposed beyond them).
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from hexgen.engine.messages import StepPlan, StepSamples
from hexgen.engine.parallel import RankContext
from hexgen.engine.sampler import logprob_width, unpack_samples

PLAN_TAG, ACTIVATION_TAG, TOKENS_TAG = 1, 2, 3
# a plan message: its pickle's length (8 bytes, little-endian), the pickle, zeros; a longer pickle's rest follows
PLAN_BYTES = 16384
_LENGTH_BYTES = 8


class Outbox:
    """Asynchronous sends of one rank, kept alive until done; at most `depth` steps outstanding."""

    def __init__(self, depth: int):
        self.depth = depth
        self._pending: deque[list[tuple[dist.Work, torch.Tensor]]] = deque()

    def send(self, tensors: list[tuple[torch.Tensor, int, int, dist.ProcessGroup | None]]) -> None:
        """One step's sends: (tensor, dst rank, tag, group) each."""
        while len(self._pending) >= self.depth:
            for work, _ in self._pending.popleft():
                work.wait()
        self._pending.append([(dist.isend(t, dst, group=g, tag=tag), t) for t, dst, tag, g in tensors])

    def flush(self) -> None:
        while self._pending:
            for work, _ in self._pending.popleft():
                work.wait()


def share_plan_in_stage(ctx: RankContext, plan: StepPlan | None) -> StepPlan:
    """The stage leader passes its plan; the stage's other ranks receive it."""
    if ctx.tp.tp_degree == 1:
        assert plan is not None
        return plan
    box: list[StepPlan | None] = [plan]
    dist.broadcast_object_list(box, group_src=0, group=ctx.tp.cpu_group)
    assert box[0] is not None
    return box[0]


def send_step(ctx: RankContext, outbox: Outbox, plan: StepPlan, hidden: torch.Tensor | None) -> None:
    """Leader of stage s -> leader of stage s+1: the plan message (and its rest), then activations [T, H]."""
    if not ctx.is_leader:
        return
    sends = [(part, ctx.next_leader, PLAN_TAG, ctx.control) for part in encode_plan(plan)]
    if hidden is not None:
        sends.append((hidden.contiguous(), ctx.next_leader, ACTIVATION_TAG, None))
    outbox.send(sends)


def encode_plan(plan: StepPlan) -> list[torch.Tensor]:
    """[PLAN_BYTES message] or, for a pickle longer than fits, [message, rest] (uint8 tensors)."""
    data = pickle.dumps(plan)
    first = min(len(data), PLAN_BYTES - _LENGTH_BYTES)
    head = bytearray(PLAN_BYTES)
    head[:_LENGTH_BYTES] = len(data).to_bytes(_LENGTH_BYTES, "little")
    head[_LENGTH_BYTES : _LENGTH_BYTES + first] = data[:first]
    parts = [torch.frombuffer(head, dtype=torch.uint8)]
    if len(data) > first:
        parts.append(torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8))
    return parts


class PlanInbox:
    """A stage leader's receive side past stage 0: the next plan message's receive is posted as soon as the last
    plan is in, so gloo takes the message in while the stage computes (see the module's docstring)."""

    def __init__(self, ctx: RankContext):
        self.ctx = ctx
        self._post()

    def _post(self) -> None:
        self._head = torch.empty(PLAN_BYTES, dtype=torch.uint8)
        self._work = dist.irecv(self._head, self.ctx.prev_leader, group=self.ctx.control, tag=PLAN_TAG)

    def next_plan(self) -> StepPlan:
        self._work.wait()
        head = self._head.numpy().tobytes()
        length = int.from_bytes(head[:_LENGTH_BYTES], "little")
        first = min(length, PLAN_BYTES - _LENGTH_BYTES)
        data = head[_LENGTH_BYTES : _LENGTH_BYTES + first]
        if length > first:  # the rest, before the next message's receive is posted (same source and tag)
            rest = torch.empty(length - first, dtype=torch.uint8)
            dist.recv(rest, self.ctx.prev_leader, group=self.ctx.control, tag=PLAN_TAG)
            data += rest.numpy().tobytes()
        plan = pickle.loads(data)
        if not plan.shutdown:
            self._post()
        return plan


def receive_step(
    ctx: RankContext, inbox: PlanInbox | None, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[StepPlan, torch.Tensor | None]:
    """A non-driver rank's next micro-batch: its plan and, past stage 0, the activations [T, H]. `inbox`: the
    PlanInbox of a leader past stage 0, else None."""
    plan = inbox.next_plan() if inbox is not None else None
    plan = share_plan_in_stage(ctx, plan)
    if ctx.is_first_stage or plan.shutdown or plan.keepalive:
        return plan, None
    hidden = torch.empty(plan.num_tokens, hidden_size, dtype=dtype, device=device)  # [T, H]
    if ctx.is_leader:
        dist.recv(hidden, ctx.prev_leader, tag=ACTIVATION_TAG)
    return plan, ctx.tp.broadcast_from_leader(hidden)


def send_samples(ctx: RankContext, outbox: Outbox, table: torch.Tensor) -> None:
    """Last stage's leader -> driver: the step's sample table (on the host)."""
    outbox.send([(table, 0, TOKENS_TAG, ctx.control)])


def receive_samples(ctx: RankContext, plan: StepPlan) -> Callable[[], StepSamples]:
    """Post the driver's receive of a step's samples now; the returned call waits for them."""
    if not plan.returns_samples:
        return lambda: StepSamples([])
    width = logprob_width(plan)
    if width:
        buf = torch.empty(plan.num_sampled + plan.num_scored, width, dtype=torch.float64)
    else:
        buf = torch.empty(plan.num_sampled, dtype=torch.int64)
    work = dist.irecv(buf, ctx.layout.last_leader, group=ctx.control, tag=TOKENS_TAG)

    def wait() -> StepSamples:
        work.wait()
        return unpack_samples(buf, plan)

    return wait
