"""StageRunner: one rank's part of one micro-batch (embed or take activations, layers, then logits + sample)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hexgen.engine.attention import build_metadata
from hexgen.engine.cpu_attention import AttentionKernel, attention_kernel_for
from hexgen.engine.host_copy import to_device
from hexgen.engine.messages import StepPlan, StepSamples
from hexgen.engine.ops import triton_serves
from hexgen.engine.parallel import RankContext
from hexgen.engine.sampler import logprob_width, sample_on_device, sample_table, unpack_samples
from hexgen.engine.stage import LlamaStage


def scored_rows(plan: StepPlan) -> list[int]:
    """The flat batch rows (among all the step's new tokens) of the prompt tokens plan.scored names."""
    starts = plan.token_starts()
    return [starts[s.row] + s.first + i for s in plan.scored for i in range(len(s.targets))]


def drawn_rows(plan: StepPlan) -> list[int]:
    """The flat batch rows whose logits are drawn from: each sampling sequence's last 1 + drafts rows."""
    starts = plan.token_starts()
    return [row for b, samples in enumerate(plan.sample) if samples
            for row in range(starts[b + 1] - 1 - plan.drafts_of(b), starts[b + 1])]


class StageRunner:
    def __init__(self, ctx: RankContext, stage: LlamaStage, device: torch.device):
        self.ctx = ctx
        self.stage = stage
        self.device = device
        self.dtype = stage.dtype
        self.use_kernel = triton_serves(device)
        self.block_size = 0  # set with the KV pool
        self.attention_kernel: AttentionKernel | None = None  # CPU: the attention kernel, set with the KV pool
        self.graphs = None  # DecodeGraphs once captured (CUDA)
        self.record_logits = False  # keep the last step's full logits on the last leader (for tests)
        self.last_logits: torch.Tensor | None = None
        self.last_sampled: torch.Tensor | None = None  # the last step's sampled token ids, on the device
        self.end_turn: Callable[[], object] = lambda: None  # once a micro-batch is handed on (engine/turns.py)

    def allocate_kv_pool(self, num_blocks: int, block_size: int) -> None:
        self.stage.allocate_kv_pool(num_blocks, block_size, head_major=not self.use_kernel)
        self.block_size = block_size
        if self.stage.layers and not self.use_kernel:
            heads = self.stage.layers[0].self_attn.heads_local
            self.attention_kernel = attention_kernel_for(self.device, self.dtype, heads, self.stage.kv_heads_local,
                                                         self.stage.spec.head_dim, block_size)

    def tune_attention(self):
        """Time the paged-attention kernel's candidate tiles over this rank's pool and launch the fastest from
        here on (kernels/attention_tuning.py); before the decode graphs are captured, which keep what they saw.
        Returns the timings (None without the Triton kernels or layers)."""
        if not (self.use_kernel and self.stage.layers):
            return None
        from hexgen.engine.kernels.attention_tuning import tune_attention

        keys, values = self.stage.layer_pools[0].paged()
        return tune_attention(keys, values, self.stage.layers[0].self_attn.heads_local)

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
            hidden = self.stage.embed(self._token_ids(plan))
        assert hidden is not None
        if self.graphs is not None and self.graphs.can_run(plan):
            out = self.graphs.run(plan, hidden)
            return out, torch.arange(plan.num_seqs, device=self.device)
        meta = build_metadata(plan, self.block_size, self.device, self.use_kernel, self.stage.kv_heads_local,
                              self.dtype, self.attention_kernel)
        self.stage.rope.reserve(meta.max_position + 1)
        return self.stage.forward_layers(hidden, meta), meta.last_token_index

    def _token_ids(self, plan: StepPlan) -> torch.Tensor:
        """The plan's token ids on the device, with the look-ahead ones taken from the last step's samples."""
        ids = to_device(plan.token_ids, self.device, torch.int64)
        if plan.fed_back:
            assert self.last_sampled is not None and self.ctx.is_last_stage, "look-ahead needs a one-rank replica"
            index, rows = to_device([list(column) for column in zip(*plan.fed_back, strict=True)], self.device)
            ids[index] = self.last_sampled[rows]
        return ids

    @torch.inference_mode()
    def sample_on_device(self, plan: StepPlan, hidden: torch.Tensor, last_rows: torch.Tensor) -> torch.Tensor | None:
        """Last stage: logits of each sampling sequence's last token and of each prompt token scored
        (plan.scored), in one LM-head call gathered on the leader, sampled there: the step's sample table on the
        device, token ids [num_sampled] int64, or where anything asks for log-probabilities float64 rows of the
        sampled then of the scored tokens (sampler.sample_table); None on the other ranks of the stage. The
        leader keeps the token ids as last_sampled (a look-ahead step takes its unknown tokens from them)."""
        self.last_sampled = None
        if not plan.returns_samples:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        # integer rows, not a boolean mask: indexing by a mask on CUDA waits for the device to count its hits
        if plan.drafts:  # a drafting sequence is drawn at its last 1 + drafts rows
            rows = to_device(drawn_rows(plan), self.device, torch.int64)
        else:
            rows = last_rows[to_device([i for i, samples in enumerate(plan.sample) if samples], self.device,
                                       torch.int64)]
        if plan.scored:
            rows = torch.cat([rows, to_device(scored_rows(plan), self.device, torch.int64)])
        local = self.stage.local_logits(hidden[rows])  # [B, vocab // tp, padded]
        parts = self.ctx.tp.gather_to_leader(local)
        if parts is None:
            return None
        logits = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))[:, : self.stage.spec.vocab_size]  # [B, V]
        drawn = logits[: plan.num_sampled]
        if self.record_logits:
            self.last_logits = drawn.float()
        self.last_sampled = sample_on_device(drawn, plan.sampling)
        width = logprob_width(plan)
        if width == 0:
            return self.last_sampled
        table = sample_table(drawn, self.last_sampled, width)
        if plan.scored:
            targets = to_device([t for s in plan.scored for t in s.targets], self.device, torch.int64)
            table = torch.cat([table, sample_table(logits[plan.num_sampled :], targets, width)])
        return table

    def sample(self, plan: StepPlan, hidden: torch.Tensor, last_rows: torch.Tensor) -> torch.Tensor | None:
        """sample_on_device's table on the host (one device-to-host copy; waits for the device)."""
        table = self.sample_on_device(plan, hidden, last_rows)
        return None if table is None else table.cpu()

    def sample_later(self, plan: StepPlan, hidden: torch.Tensor, last_rows: torch.Tensor) -> Callable[[], StepSamples]:
        """A one-rank replica's samples, fetched when called: on CUDA the copy to the host is queued behind the
        step, and only the call waits for it, so the driver can queue its next step first."""
        table = self.sample_on_device(plan, hidden, last_rows)
        assert table is not None
        if table.device.type != "cuda":
            samples = unpack_samples(table, plan)
            return lambda: samples
        host = table.to("cpu", non_blocking=True)  # into pinned memory
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(table.device))  # the stream the copy was queued on

        def wait() -> StepSamples:
            copied.synchronize()
            return unpack_samples(host, plan)

        return wait
