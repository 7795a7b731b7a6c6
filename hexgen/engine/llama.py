"""One pipeline stage of a Llama-family decoder: its layers, TP-sharded, plus embedding / final norm + head.

Tokens of all sequences in a step are packed into one flat batch [T, H]; each layer writes the step's keys
and values into the paged pool and attends for the whole batch in one call (`engine/attention.py`). The
residual stream is carried beside the hidden states so each residual add is fused with the RMSNorm that
follows it. Layer numbering is global, as in the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hexgen.engine.attention import LayerPool, StepMetadata, paged_attention
from hexgen.engine.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
)
from hexgen.engine.ops import Rope, add_rms_norm, rotary_write_kv, silu_mul
from hexgen.engine.parallel import TPGroup
from hexgen.engine.weights import CheckpointReader
from hexgen.models import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm(x, None, self.weight, self.eps)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused with the norm (one kernel on CUDA)."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding:
    """cos/sin tables of rotate-half RoPE, with optional Llama-3 frequency scaling."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
        inv_freq = 1.0 / (
            spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float() / spec.head_dim)
        )
        if spec.rope_scaling is not None:
            inv_freq = _llama3_scaled(inv_freq, spec)
        self.inv_freq = inv_freq.to(device)
        self.dtype = dtype
        self._cos = self._sin = torch.empty(0)

    def reserve(self, num_positions: int) -> None:
        """Tables for positions [0, num_positions) at least (grown by doubling; never inside a CUDA graph)."""
        if num_positions > self._cos.shape[0]:
            length = max(num_positions, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(length, device=self.inv_freq.device).float(), self.inv_freq)
            self._cos, self._sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)

    def tables(self, positions: torch.Tensor, interleaved: bool = False) -> Rope:
        """cos, sin [T, head_dim / 2] for the given positions (rotate-half: both halves share them), or for
        interleaved pairs one complex tensor cos + i sin [T, 1, head_dim / 2]; the positions must be below what
        `reserve` covered."""
        if interleaved:
            return torch.complex(self._cos[positions], self._sin[positions]).unsqueeze(1)  # [T, 1, d / 2]
        return self._cos[positions], self._sin[positions]


def _llama3_scaled(inv_freq: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    rs = spec.rope_scaling
    assert rs is not None
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.heads_local = spec.num_heads // tp.tp_degree
        self.kv_heads_local = spec.num_kv_heads // tp.tp_degree
        q_size = spec.num_heads * spec.head_dim
        self.qkv_proj = ColumnParallelLinear(spec.hidden_size, [q_size, spec.kv_dim, spec.kv_dim], tp, dtype)
        self.o_proj = RowParallelLinear(q_size, spec.hidden_size, tp, dtype)
        self.rope_interleaved = False

    @torch.no_grad()
    def interleave_rope(self) -> None:
        """Reorder each q and k head's rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1), so
        RoPE is one complex multiplication in place (4x faster than rotate-half on the 2-core EPYC). Queries and
        keys are permuted alike, so their dot products, the attention and the output are unchanged; the cached
        keys are stored in this order. Once only: a second call would scramble the rows."""
        if self.rope_interleaved:
            return
        d, half = self.head_dim, self.head_dim // 2
        order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # [d]
        qk_rows = (self.heads_local + self.kv_heads_local) * d
        head_base = torch.arange(0, qk_rows, d).unsqueeze(1)  # [q and k heads, 1]
        rows = (head_base + order.to(self.qkv_proj.weight.device)).flatten()
        self.qkv_proj.weight[:qk_rows] = self.qkv_proj.weight[rows]
        self.rope_interleaved = True

    def forward(
        self, x: torch.Tensor, meta: StepMetadata, rope: Rope, pool: LayerPool,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output [T, H] summed over the TP group, plus `residual` when given."""
        tokens = x.shape[0]
        heads, kv_heads, d = self.heads_local, self.kv_heads_local, self.head_dim
        qkv = self.qkv_proj.fused(x).view(tokens, heads + 2 * kv_heads, d)  # q, k and v heads side by side
        q = rotary_write_kv(qkv, heads, rope, pool, meta)  # q, k rotated; k, v into the pool
        out = paged_attention(q, pool, meta, self.scale)  # [T, h_local, d]
        partial = self.o_proj.forward(out.reshape(tokens, heads * d), residual)
        return self.tp.all_reduce(partial)  # row-parallel output: sum over the stage's TP group


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.gate_up_proj = ColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, tp, dtype)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, tp, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MLP output [T, H] summed over the TP group, plus `residual` when given."""
        gate, up = self.gate_up_proj.forward(x)
        partial = self.down_proj.forward(silu_mul(gate, up), residual)
        return self.tp.all_reduce(partial)  # row-parallel output: sum over the stage's TP group


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, tp, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = MLP(spec, tp, dtype)

    def load(self, reader: CheckpointReader) -> None:
        p = f"model.layers.{self.index}."
        self.input_layernorm.weight.copy_(reader.read(p + "input_layernorm.weight"))
        self.post_attention_layernorm.weight.copy_(reader.read(p + "post_attention_layernorm.weight"))
        self.self_attn.qkv_proj.load(reader, [p + f"self_attn.{n}_proj.weight" for n in "qkv"])
        self.self_attn.o_proj.load(reader, p + "self_attn.o_proj.weight")
        self.mlp.gate_up_proj.load(reader, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        self.mlp.down_proj.load(reader, p + "mlp.down_proj.weight")

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: StepMetadata,
        rope: Rope,
        pool: LayerPool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(this layer's output, the residual stream before it): their sum is the layer's usual output.

        With oneDNN-packed weights (CPU) the residual adds run in the output projections' GEMM epilogues and the
        norms inside the input projections (folded into their packed weights: the projections take the residual
        stream itself), and the layer returns (its whole output, None). Elsewhere (CUDA) each add is fused with
        the norm after it.
        """
        if self.self_attn.qkv_proj.folds_norm():
            assert self.mlp.gate_up_proj.folds_norm() and self.self_attn.o_proj.packed is not None
            stream = hidden if residual is None else hidden + residual
            mid = self.self_attn.forward(stream, meta, rope, pool, stream)  # input_layernorm inside qkv_proj
            return self.mlp.forward(mid, mid), None  # post_attention_layernorm inside gate_up_proj
        if residual is None:
            residual, hidden = hidden, self.input_layernorm.forward(hidden)
        else:
            hidden, residual = self.input_layernorm.add_forward(hidden, residual)
        # .forward, not __call__: nn.Module's hooks machinery costs more than a small decode op (CPU)
        hidden = self.self_attn.forward(hidden, meta, rope, pool)
        hidden, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        return self.mlp.forward(hidden), residual
