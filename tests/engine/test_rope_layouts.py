"""The CPU path's interleaved RoPE against transformers' rotate-half formula, and the q/k row reordering that
makes it equivalent: same attention scores, same layer output."""

from __future__ import annotations

import torch

from hexgen.engine.llama import Attention
from hexgen.engine.ops import apply_rotary_interleaved_
from hexgen.engine.parallel import TPGroup
from hexgen.models import ModelSpec


def rotate_half_reference(x, cos_half, sin_half):
    """transformers' apply_rotary_pos_emb for one of q or k: x * cos + rotate_half(x) * sin."""
    cos = torch.cat([cos_half, cos_half], dim=-1).unsqueeze(1)
    sin = torch.cat([sin_half, sin_half], dim=-1).unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def interleave(x):
    """Rotate-half order (i, i + d/2) -> adjacent pairs (2i, 2i + 1) along the last dimension."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)


def test_interleaved_rotation_is_rotate_half_in_another_order():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 16, generator=gen)
    angles = torch.rand(5, 8, generator=gen) * 50
    expected = interleave(rotate_half_reference(x, angles.cos(), angles.sin()))
    got = interleave(x).contiguous()
    apply_rotary_interleaved_(got, torch.polar(torch.ones_like(angles), angles).unsqueeze(1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reordered_rows_give_the_same_attention_scores():
    spec = ModelSpec(name="t", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                     head_dim=8, vocab_size=50, max_context=64)
    torch.manual_seed(0)
    attn = Attention(spec, TPGroup(0, 1), torch.float32)
    attn.qkv_proj.weight.normal_()
    x = torch.randn(3, 32)
    angles = torch.rand(3, spec.head_dim // 2) * 20
    d, heads, kv = spec.head_dim, spec.num_heads, spec.num_kv_heads

    def scores(qkv, rotate):
        q = qkv[:, : heads * d].reshape(3, heads, d)
        k = qkv[:, heads * d : (heads + kv) * d].reshape(3, kv, d)
        q, k = rotate(q), rotate(k)
        return torch.einsum("thd,tgd->thg", q, k)  # every query head against every key head, per token

    before = scores(attn.qkv_proj.fused(x), lambda t: rotate_half_reference(t, angles.cos(), angles.sin()))
    v_before = attn.qkv_proj.fused(x)[:, (heads + kv) * d :]
    attn.interleave_rope()

    def rotate_interleaved(t):
        t = t.contiguous()
        apply_rotary_interleaved_(t, torch.polar(torch.ones_like(angles), angles).unsqueeze(1))
        return t

    after = scores(attn.qkv_proj.fused(x), rotate_interleaved)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attn.qkv_proj.fused(x)[:, (heads + kv) * d :], v_before)  # values untouched
