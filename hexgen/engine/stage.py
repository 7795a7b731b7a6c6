"""LlamaStage: the part of the model one rank owns (embedding if first, its layers, norm + head if last)."""

from __future__ import annotations

import torch
from torch import nn

from hexgen.engine.kv_cache import KVCache
from hexgen.engine.layers import ParallelLMHead, VocabParallelEmbedding
from hexgen.engine.llama import DecoderLayer, ForwardBatch, RMSNorm, RotaryEmbedding
from hexgen.engine.parallel import RankContext
from hexgen.engine.weights import CheckpointReader
from hexgen.models import ModelSpec


class LlamaStage(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: RankContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.spec = spec
        self.ctx = ctx
        first, end = ctx.layers
        tp = ctx.tp
        with torch.device(device):
            self.embed_tokens = (
                VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype) if ctx.is_first_stage else None
            )
            self.layers = nn.ModuleList(DecoderLayer(spec, i, tp, dtype) for i in range(first, end))
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype) if ctx.is_last_stage else None
            self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp, dtype) if ctx.is_last_stage else None
        self.rope = RotaryEmbedding(spec, dtype, device)
        self.cache = KVCache(len(self.layers), spec.num_kv_heads // tp.tp_degree, spec.head_dim, dtype, device)

    @torch.no_grad()
    def load(self, reader: CheckpointReader, progress=None) -> None:
        """Copy this rank's shards in from the checkpoint; `progress(n)` is called per layer."""
        if self.embed_tokens is not None:
            self.embed_tokens.load(reader, "model.embed_tokens.weight")
        for layer in self.layers:
            layer.load(reader)
            if progress is not None:
                progress(1)
        if self.norm is not None and self.lm_head is not None:
            self.norm.weight.copy_(reader.read("model.norm.weight"))
            tied = self.spec.tie_word_embeddings or not reader.has("lm_head.weight")
            if tied and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight  # one shard serves both ends
            else:
                self.lm_head.load(reader, "model.embed_tokens.weight" if tied else "lm_head.weight")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None
        return self.embed_tokens(token_ids)  # [T] -> [T, H]

    def forward_layers(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        for slot, start, n in zip(batch.slots, batch.starts, batch.lengths, strict=True):
            self.cache.reserve(slot, start + n)
        rope = self.rope.tables(batch.positions)
        for local, layer in enumerate(self.layers):
            hidden = layer(hidden, batch, rope, self.cache, local)
        return hidden  # [T, H]

    def local_logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary shard for each sequence's last token: [B, padded_rows]."""
        assert self.norm is not None and self.lm_head is not None
        return self.lm_head(self.norm(hidden_last))
