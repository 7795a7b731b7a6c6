"""One pipeline stage of a Llama-family decoder: its layers, TP-sharded, plus embedding / final norm + head.

Tokens of all sequences in a step are packed into one flat batch [T, H]; attention walks the
sequences so each reads only its own KV cache. Layer numbering is global, as in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.engine.kv_cache import KVCache
from hexgen.engine.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
)
from hexgen.engine.parallel import TPGroup
from hexgen.engine.weights import CheckpointReader
from hexgen.models import ModelSpec


@dataclass
class ForwardBatch:
    """Where each sequence's new tokens sit in the flat batch and in its KV cache."""

    slots: list[int]  # KV-cache slot of each sequence
    starts: list[int]  # tokens already cached for each sequence (position of its first new token)
    lengths: list[int]  # new tokens of each sequence in this step
    positions: torch.Tensor  # [T] int64, position of every new token

    @property
    def last_token_index(self) -> torch.Tensor:
        """Index in the flat batch of each sequence's last new token: [B]."""
        ends = torch.tensor(self.lengths).cumsum(0)
        return ends - 1

    @staticmethod
    def build(slots: list[int], starts: list[int], lengths: list[int], device: torch.device) -> ForwardBatch:
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]).to(device)
        return ForwardBatch(slots, starts, lengths, positions)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the compute dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] for the given positions."""
        needed = int(positions.max()) + 1
        if needed > self._cos.shape[0]:
            length = max(needed, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(length, device=self.inv_freq.device).float(), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.head_dim = spec.head_dim
        self.heads_local = spec.num_heads // tp.tp_degree
        self.kv_heads_local = spec.num_kv_heads // tp.tp_degree
        q_size = spec.num_heads * spec.head_dim
        self.qkv_proj = ColumnParallelLinear(spec.hidden_size, [q_size, spec.kv_dim, spec.kv_dim], tp, dtype)
        self.o_proj = RowParallelLinear(q_size, spec.hidden_size, tp, dtype)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, layer: int
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q = apply_rotary(q.view(tokens, self.heads_local, self.head_dim), *rope)  # [T, h_local, d]
        k = apply_rotary(k.view(tokens, self.kv_heads_local, self.head_dim), *rope)  # [T, kv_local, d]
        v = v.view(tokens, self.kv_heads_local, self.head_dim)
        out = torch.empty_like(q)
        offset = 0
        for slot, start, n in zip(batch.slots, batch.starts, batch.lengths, strict=True):
            keys, values = cache.append(layer, slot, start, k[offset : offset + n], v[offset : offset + n])
            # 4-D [1, heads, tokens, d] inputs take SDPA's fast CPU kernel; 3-D ones do not.
            query = q[offset : offset + n].transpose(0, 1).unsqueeze(0)  # [1, h_local, n, d]
            mask = _prefix_causal_mask(start, n, x.device) if start > 0 and n > 1 else None
            attended = F.scaled_dot_product_attention(
                query,
                keys.unsqueeze(0),
                values.unsqueeze(0),
                attn_mask=mask,
                is_causal=start == 0 and n > 1,
                enable_gqa=True,
            )
            out[offset : offset + n] = attended[0].transpose(0, 1)
            offset += n
        partial = self.o_proj(out.view(tokens, self.heads_local * self.head_dim))
        return self.tp.all_reduce(partial)  # row-parallel output: sum over the stage's TP group


def _prefix_causal_mask(start: int, n: int, device: torch.device) -> torch.Tensor:
    """Boolean [n, start+n]: new token i sees the cached prefix and new tokens up to itself."""
    cols = torch.arange(start + n, device=device)
    return cols.unsqueeze(0) <= (start + torch.arange(n, device=device)).unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.gate_up_proj = ColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, tp, dtype)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, tp, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        partial = self.down_proj(F.silu(gate) * up)
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
        x: torch.Tensor,
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        local_layer: int,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, rope, cache, local_layer)
        return x + self.mlp(self.post_attention_layernorm(x))
