"""LlamaStage: the part of the model one rank owns (embedding if first, its layers, norm + head if last)."""

from __future__ import annotations

import torch
from torch import nn

from hexgen.engine.attention import LayerPool, StepMetadata
from hexgen.engine.layers import PackableLinear, ParallelLMHead, VocabParallelEmbedding, packs_for_cpu
from hexgen.engine.llama import DecoderLayer, RMSNorm, RotaryEmbedding
from hexgen.engine.parallel import RankContext
from hexgen.engine.weights import CheckpointReader
from hexgen.models import ModelSpec


class LlamaStage(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: RankContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.spec = spec
        self.ctx = ctx
        self.dtype = dtype  # of weights, activations and the KV pool
        self.device = device
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
        self.kv_heads_local = spec.num_kv_heads // tp.tp_degree
        self.rope_interleaved = False  # set by pack_weights
        self.kv_pool = torch.empty(0)  # [layers, blocks, block_size * 2 * kv_heads_local * head_dim] once allocated
        self.layer_pools: list[LayerPool] = []  # views of kv_pool, one per layer

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block takes in this rank's pool (keys and values of all its layers)."""
        element = self.dtype.itemsize
        return len(self.layers) * 2 * block_size * self.kv_heads_local * self.spec.head_dim * element

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights as held: dense ones (a tied weight once) and the CPU-packed copies."""
        held = {id(p): p for p in self.parameters() if not p.is_meta}.values()  # meta: dropped for a packed copy
        dense = sum(p.numel() * p.element_size() for p in held)
        return dense + sum(m.packed_bytes() for m in self.modules() if isinstance(m, PackableLinear))

    def pack_weights(self) -> None:
        """Keep each linear layer's weight in oneDNN's layout instead (CPU fp32, and bf16 where the CPU has bf16
        arithmetic; elsewhere a no-op), one layer at a time, so the rank's memory never holds both layouts of more
        than one layer. Each RMSNorm is folded into the packed projection after it (see layers.rms_normed_linear),
        and in fp32 attention layers also take their q and k rows in interleaved-RoPE order (see
        Attention.interleave_rope: a complex multiplication, which torch has no bf16 type for). A tied LM head
        keeps its dense weight: it is the embedding table."""
        for layer in self.layers:
            if packs_for_cpu(layer.self_attn.qkv_proj.weight) and self.dtype == torch.float32:
                layer.self_attn.interleave_rope()
            attention_norm, mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
            layer.self_attn.qkv_proj.pack(attention_norm.weight, attention_norm.eps)
            layer.mlp.gate_up_proj.pack(mlp_norm.weight, mlp_norm.eps)
            layer.self_attn.o_proj.pack()
            layer.mlp.down_proj.pack()
            for projection in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.self_attn.o_proj,
                               layer.mlp.down_proj):
                projection.drop_dense()
        if self.lm_head is not None:
            assert self.norm is not None
            self.lm_head.pack(self.norm.weight, self.norm.eps)
            if self.embed_tokens is None or self.lm_head.weight is not self.embed_tokens.weight:
                self.lm_head.drop_dense()
        self.rope_interleaved = bool(self.layers) and self.layers[0].self_attn.rope_interleaved

    def allocate_kv_pool(self, num_blocks: int, block_size: int, head_major: bool) -> None:
        """The paged pool, zeroed (keys that a mask hides must still be finite numbers), each block's heads
        head-major for the gather path or slot-major for the Triton kernels (attention.LayerPool)."""
        block_elements = block_size * 2 * self.kv_heads_local * self.spec.head_dim
        self.kv_pool = torch.zeros((len(self.layers), num_blocks, block_elements), dtype=self.dtype, device=self.device)
        self.layer_pools = [LayerPool.of(layer_pool, block_size, self.kv_heads_local, self.spec.head_dim, head_major)
                            for layer_pool in self.kv_pool]

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

    def forward_layers(self, hidden: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """hidden [T, H] through this stage's layers; the positions must be below `rope.reserve`'s."""
        rope = self.rope.tables(meta.positions, self.rope_interleaved)
        residual = None
        for layer, pool in zip(self.layers, self.layer_pools, strict=True):
            hidden, residual = layer.forward(hidden, residual, meta, rope, pool)
        return hidden if residual is None else hidden + residual  # [T, H], the residual stream

    def local_logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary shard for each sequence's last token: [B, padded_rows]."""
        assert self.norm is not None and self.lm_head is not None
        if self.lm_head.folds_norm():
            return self.lm_head(hidden_last)  # the final norm runs inside the packed head
        return self.lm_head(self.norm(hidden_last))
