"""RoPE + KV-write kernel vs HF's rotate-half formula in the model dtype and index_copy_ into the pool."""

from __future__ import annotations

import pytest
import torch


def rotate_half_reference(x, cos_half, sin_half):
    """transformers' apply_rotary_pos_emb for one of q or k: x * cos + rotate_half(x) * sin, in x's dtype."""
    cos = torch.cat([cos_half, cos_half], dim=-1).unsqueeze(1)  # [T, 1, D]
    sin = torch.cat([sin_half, sin_half], dim=-1).unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def check(device, dtype, num_q_heads, num_kv_heads, head_dim, block_size, slots):
    from hexgen.engine.kernels import rotary_write_kv

    gen = torch.Generator().manual_seed(head_dim + num_q_heads)
    num_tokens, num_blocks = len(slots), 8
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype).to(device)  # merged projection output
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, -1)
    v = qkv[:, (num_q_heads + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    angles = torch.rand(num_tokens, head_dim // 2, generator=gen) * 100
    cos, sin = angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)
    pool_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(pool_shape).to(dtype).to(device), torch.randn(pool_shape).to(dtype).to(device)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)

    expected_q = rotate_half_reference(q, cos, sin)
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    keep = slot_mapping >= 0
    flat = (-1, num_kv_heads, head_dim)
    expected_k_cache.view(flat).index_copy_(0, slot_mapping[keep], rotate_half_reference(k, cos, sin)[keep])
    expected_v_cache.view(flat).index_copy_(0, slot_mapping[keep], v[keep])
    k_before = k.clone()

    rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    assert torch.equal(k, k_before) and torch.equal(v_cache, expected_v_cache)
    if dtype == torch.float32 or (dtype == torch.float16 and device.type == "cpu"):
        # each product rounded, then their sum, as torch's ops round them (no fused multiply-adds): bit for bit
        torch.testing.assert_close(q, expected_q, atol=0, rtol=0)
        torch.testing.assert_close(k_cache, expected_k_cache, atol=0, rtol=0)
        return
    # Two units in the last place (values here are below 4): on CPU the interpreter truncates bf16 where torch
    # rounds; on a GPU a 16-bit sum is rounded once from the exact value where torch rounds it to fp32 first, which
    # can differ in a rare tie. Fused, a quarter of the bf16 elements were one unit off (H200, Triton 3.6).
    unit = torch.finfo(dtype).eps
    for got, want in ((q, expected_q), (k_cache, expected_k_cache)):
        torch.testing.assert_close(got, want, atol=4 * unit, rtol=2 * unit)
        if device.type == "cuda":
            assert (got != want).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_hf_rotary_and_index_copy(device, dtype):
    check(device, dtype, 8, 2, 32, 16, [5, 17, 0, 127, 64])


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(3, 3, 24), (32, 8, 128)])
def test_shapes_and_padding_rows(device, num_q_heads, num_kv_heads, head_dim):
    check(device, torch.float32, num_q_heads, num_kv_heads, head_dim, 4, [3, -1, 30, -1])
