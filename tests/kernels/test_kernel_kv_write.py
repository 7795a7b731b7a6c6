"""KV-write kernel vs torch's index_copy_ into the flattened pool."""

from __future__ import annotations

import pytest
import torch


def make_pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape).to(dtype).to(device), torch.randn(shape).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 32), (1, 3, 24), (32, 8, 128)])
def test_matches_index_copy(device, dtype, block_size, num_kv_heads, head_dim):
    from hexgen.engine.kernels import write_kv

    num_blocks, num_tokens = 12, 9
    k_cache, v_cache = make_pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    # k and v as strided views of one merged projection output [T, (Hq + 2 Hkv) * D] with Hq = Hkv
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim).to(dtype).to(device)
    k = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    expected_v.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_negative_slots_write_nothing(device):
    from hexgen.engine.kernels import write_kv

    k_cache, v_cache = make_pool(4, 16, 2, 32, torch.float32, device)
    k, v = torch.randn(3, 2, 32, device=device), torch.randn(3, 2, 32, device=device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k.view(-1, 2, 32)[17], expected_v.view(-1, 2, 32)[17] = k[1], v[1]
    write_kv(k, v, k_cache, v_cache, torch.tensor([-1, 17, -1], device=device))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
