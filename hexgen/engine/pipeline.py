"""Everything a replica's ranks say to each other between stages, in one place.

- the driver's StepPlan goes to every rank over the gloo control group;
- activations [T, H] go from stage s's leader to stage s+1's leader (point to point), and that
  leader broadcasts them inside its TP group; no other rank sends or receives;
- the tokens sampled on the last stage's leader are broadcast to every rank over the control group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hexgen.engine.messages import StepPlan
from hexgen.engine.parallel import RankContext


def broadcast_plan(ctx: RankContext, plan: StepPlan | None) -> StepPlan:
    """The driver passes its plan; every other rank passes None and receives it."""
    if ctx.control is None:
        assert plan is not None
        return plan
    box: list[StepPlan | None] = [plan]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    assert box[0] is not None
    return box[0]


def send_activation(ctx: RankContext, hidden: torch.Tensor) -> None:
    if ctx.is_leader:
        dist.send(hidden.contiguous(), dst=ctx.next_leader)  # [T, H]


def recv_activation(
    ctx: RankContext, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    hidden = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)  # [T, H]
    if ctx.is_leader:
        dist.recv(hidden, src=ctx.prev_leader)
    return ctx.tp.broadcast_from_leader(hidden)


def share_sampled_tokens(ctx: RankContext, tokens: list[int] | None, count: int) -> list[int]:
    """The last stage's leader passes its tokens; every rank returns them."""
    if ctx.control is None:
        assert tokens is not None
        return tokens
    buf = torch.tensor(tokens, dtype=torch.int64) if tokens is not None else torch.empty(count, dtype=torch.int64)
    dist.broadcast(buf, src=ctx.layout.last_leader, group=ctx.control)
    return buf.tolist()
