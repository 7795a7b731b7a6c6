"""Everything a replica's ranks say to each other per step, in one place.

A step (micro-batch) travels down the pipeline with its plan; nothing goes to every rank at once:
- the driver (stage 0's leader) broadcasts the plan inside stage 0's TP group;
- stage s's leader sends the plan (bytes, over the gloo control group) and the activations [T, H] (over the
  default group: NCCL on GPUs) to stage s+1's leader, which broadcasts both inside its TP group;
- the last stage's leader sends the sampled token ids [num_sampled] back to the driver, and only to it.
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

from hexgen.engine.messages import StepPlan
from hexgen.engine.parallel import RankContext

PLAN_TAG, ACTIVATION_TAG, TOKENS_TAG = 1, 2, 3


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
    """Leader of stage s -> leader of stage s+1: plan length, plan bytes, then activations [T, H]."""
    if not ctx.is_leader:
        return
    payload = torch.frombuffer(bytearray(pickle.dumps(plan)), dtype=torch.uint8)
    sends = [(torch.tensor([payload.numel()], dtype=torch.int64), ctx.next_leader, PLAN_TAG, ctx.control),
             (payload, ctx.next_leader, PLAN_TAG, ctx.control)]
    if hidden is not None:
        sends.append((hidden.contiguous(), ctx.next_leader, ACTIVATION_TAG, None))
    outbox.send(sends)


def receive_step(
    ctx: RankContext, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[StepPlan, torch.Tensor | None]:
    """A non-driver rank's next micro-batch: its plan and, past stage 0, the activations [T, H]."""
    plan = None
    if ctx.is_leader:  # leaders past stage 0 (stage 0's leader is the driver)
        length = torch.empty(1, dtype=torch.int64)
        dist.recv(length, ctx.prev_leader, group=ctx.control, tag=PLAN_TAG)
        payload = torch.empty(int(length), dtype=torch.uint8)
        dist.recv(payload, ctx.prev_leader, group=ctx.control, tag=PLAN_TAG)
        plan = pickle.loads(payload.numpy().tobytes())
    plan = share_plan_in_stage(ctx, plan)
    if ctx.is_first_stage or plan.shutdown or plan.keepalive:
        return plan, None
    hidden = torch.empty(plan.num_tokens, hidden_size, dtype=dtype, device=device)  # [T, H]
    if ctx.is_leader:
        dist.recv(hidden, ctx.prev_leader, tag=ACTIVATION_TAG)
    return plan, ctx.tp.broadcast_from_leader(hidden)


def send_tokens(ctx: RankContext, outbox: Outbox, tokens: list[int]) -> None:
    """Last stage's leader -> driver: the step's sampled token ids."""
    outbox.send([(torch.tensor(tokens, dtype=torch.int64), 0, TOKENS_TAG, ctx.control)])


def receive_tokens(ctx: RankContext, count: int) -> Callable[[], list[int]]:
    """Post the driver's receive of a step's sampled tokens now; the returned call waits for them."""
    if count == 0:
        return list
    buf = torch.empty(count, dtype=torch.int64)
    work = dist.irecv(buf, ctx.layout.last_leader, group=ctx.control, tag=TOKENS_TAG)

    def wait() -> list[int]:
        work.wait()
        return buf.tolist()

    return wait
