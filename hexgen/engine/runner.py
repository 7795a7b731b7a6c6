"""StageRunner: one rank's part of one micro-batch (embed or take activations, layers, then logits + sample)."""

from __future__ import annotations

import torch

from hexgen.engine.attention import StepMetadata, build_metadata
from hexgen.engine.messages import StepPlan
from hexgen.engine.ops import triton_serves
from hexgen.engine.parallel import RankContext
from hexgen.engine.sampler import sample
from hexgen.engine.stage import LlamaStage


class StageRunner:
    def __init__(self, ctx: RankContext, stage: LlamaStage, device: torch.device):
        self.ctx = ctx
        self.stage = stage
        self.device = device
        self.dtype = next(stage.parameters()).dtype
        self.use_kernel = triton_serves(device)
        self.block_size = 0  # set with the KV pool
        self.record_logits = False  # keep the last step's full logits on the last leader (for tests)
        self.last_logits: torch.Tensor | None = None

    def allocate_kv_pool(self, num_blocks: int, block_size: int) -> None:
        self.stage.allocate_kv_pool(num_blocks, block_size)
        self.block_size = block_size

    @torch.inference_mode()
    def forward(self, plan: StepPlan, hidden: torch.Tensor | None) -> tuple[torch.Tensor, StepMetadata]:
        """This stage's layers over the micro-batch: stage 0 embeds the plan's tokens, later stages take the
        previous stage's activations [T, H]."""
        meta = build_metadata(plan, self.block_size, self.device, self.use_kernel)
        if self.ctx.is_first_stage:
            hidden = self.stage.embed(torch.tensor(plan.token_ids).to(self.device, non_blocking=True))
        assert hidden is not None
        return self.stage.forward_layers(hidden, meta), meta

    @torch.inference_mode()
    def sample(self, plan: StepPlan, hidden: torch.Tensor, meta: StepMetadata) -> list[int] | None:
        """Last stage: logits of each sampling sequence's last token, gathered on the leader, sampled there."""
        if plan.num_sampled == 0:
            return []
        rows = meta.last_token_index[torch.tensor(plan.sample).to(self.device, non_blocking=True)]
        local = self.stage.local_logits(hidden[rows])  # [B, vocab // tp, padded]
        parts = self.ctx.tp.gather_to_leader(local)
        if parts is None:
            return None
        logits = torch.cat(parts, dim=-1)[:, : self.stage.spec.vocab_size]  # [B, V]
        if self.record_logits:
            self.last_logits = logits.float()
        return sample(logits, plan.sampling)
