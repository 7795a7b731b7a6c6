"""StageRunner: runs one StepPlan on one rank (embed or receive, layers, send or sample)."""

from __future__ import annotations

import torch

from hexgen.engine import pipeline
from hexgen.engine.llama import ForwardBatch
from hexgen.engine.messages import StepPlan
from hexgen.engine.parallel import RankContext
from hexgen.engine.sampler import Sampler
from hexgen.engine.stage import LlamaStage


class StageRunner:
    def __init__(self, ctx: RankContext, stage: LlamaStage, device: torch.device):
        self.ctx = ctx
        self.stage = stage
        self.device = device
        self.dtype = next(stage.parameters()).dtype
        self.sampler = Sampler()
        self.record_logits = False  # keep the last step's full logits on the last leader (for tests)
        self.last_logits: torch.Tensor | None = None

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[int]:
        """Run the plan's forward pass; every rank returns the tokens sampled on the last stage."""
        for slot in plan.freed:
            self.stage.cache.free(slot)
            self.sampler.leave(slot)
        for slot, params in plan.joining.items():
            self.sampler.join(slot, params)
        if plan.num_tokens == 0:
            return []
        batch = ForwardBatch.build(plan.slots, plan.starts, plan.lengths, self.device)
        if self.ctx.is_first_stage:
            hidden = self.stage.embed(torch.tensor(plan.token_ids, device=self.device))
        else:
            hidden = pipeline.recv_activation(
                self.ctx, plan.num_tokens, self.stage.spec.hidden_size, self.dtype, self.device
            )
        hidden = self.stage.forward_layers(hidden, batch)
        tokens = None
        if not self.ctx.is_last_stage:
            pipeline.send_activation(self.ctx, hidden)
        elif plan.num_sampled:
            tokens = self._sample(plan, hidden, batch)
        if plan.num_sampled == 0:
            return []
        return pipeline.share_sampled_tokens(self.ctx, tokens, plan.num_sampled)

    def _sample(self, plan: StepPlan, hidden: torch.Tensor, batch: ForwardBatch) -> list[int] | None:
        rows = batch.last_token_index[torch.tensor(plan.sample)]
        local = self.stage.local_logits(hidden[rows.to(self.device)])  # [B, vocab // tp, padded]
        parts = self.ctx.tp.gather_to_leader(local)
        if parts is None:
            return None
        logits = torch.cat(parts, dim=-1)[:, : self.stage.spec.vocab_size].float()  # [B, V]
        if self.record_logits:
            self.last_logits = logits
        slots = [slot for slot, s in zip(plan.slots, plan.sample, strict=True) if s]
        return self.sampler.sample(logits, slots)
