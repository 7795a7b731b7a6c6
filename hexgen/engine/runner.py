"""StageRunner: one rank's part of one micro-batch (embed or take activations, layers, then logits + sample)."""

from __future__ import annotations

import torch

from hexgen.engine.attention import build_metadata
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
        self.dtype = stage.dtype
        self.use_kernel = triton_serves(device)
        self.block_size = 0  # set with the KV pool
        self.graphs = None  # DecodeGraphs once captured (CUDA)
        self.record_logits = False  # keep the last step's full logits on the last leader (for tests)
        self.last_logits: torch.Tensor | None = None

    def allocate_kv_pool(self, num_blocks: int, block_size: int) -> None:
        self.stage.allocate_kv_pool(num_blocks, block_size)
        self.block_size = block_size

    def capture_decode_graphs(self, max_batch: int, max_context: int) -> None:
        """CUDA graphs of this stage's decode steps (needs CUDA and the Triton kernels; else a no-op)."""
        if self.use_kernel:
            from hexgen.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.stage, max_batch, max_context, self.block_size)

    @torch.inference_mode()
    def forward(self, plan: StepPlan, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """This stage's layers over the micro-batch: stage 0 embeds the plan's tokens, later stages take the
        previous stage's activations [T, H]. Returns the output [T, H] and each sequence's last row [B]."""
        if self.ctx.is_first_stage:
            hidden = self.stage.embed(torch.tensor(plan.token_ids).to(self.device, non_blocking=True))
        assert hidden is not None
        if self.graphs is not None and self.graphs.can_run(plan):
            out = self.graphs.run(plan, hidden)
            return out, torch.arange(plan.num_seqs, device=self.device)
        meta = build_metadata(plan, self.block_size, self.device, self.use_kernel, self.dtype)
        self.stage.rope.reserve(meta.max_position + 1)
        return self.stage.forward_layers(hidden, meta), meta.last_token_index

    @torch.inference_mode()
    def sample(self, plan: StepPlan, hidden: torch.Tensor, last_rows: torch.Tensor) -> list[int] | None:
        """Last stage: logits of each sampling sequence's last token, gathered on the leader, sampled there."""
        if plan.num_sampled == 0:
            return []
        rows = last_rows[torch.tensor(plan.sample).to(self.device, non_blocking=True)]
        local = self.stage.local_logits(hidden[rows])  # [B, vocab // tp, padded]
        parts = self.ctx.tp.gather_to_leader(local)
        if parts is None:
            return None
        logits = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))[:, : self.stage.spec.vocab_size]  # [B, V]
        if self.record_logits:
            self.last_logits = logits.float()
        return sample(logits, plan.sampling)
