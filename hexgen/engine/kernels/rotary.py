"""RoPE on q and k plus the KV-cache write, in one launch per layer (Triton).

Replaces the rotary arithmetic on q and k (several elementwise launches) and the two `index_copy_`
writes of the torch path. Rounding follows HF's `q * cos + rotate_half(q) * sin` in the model dtype:
each product is rounded to that dtype, then their sum, so bf16 results equal transformers' bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hexgen.engine.kernels._common import check_dtype

# Compiled for a GPU, LLVM would fuse x1 * cos - x2 * sin into one multiply-add whose first product is never
# rounded (about a quarter of the bf16 elements one unit off torch's, seen on an H200 with Triton 3.6): each product
# stays rounded on its own, as torch's separate ops round them. The interpreter never fuses.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _rotate(x1, x2, cos, sin, dtype: tl.constexpr):
    """Rotate-half RoPE of the halves x1, x2 (float32) with each product rounded to `dtype`, as torch does."""
    a = (x1 * cos).to(dtype).to(tl.float32)
    b = (x2 * sin).to(dtype).to(tl.float32)
    c = (x2 * cos).to(dtype).to(tl.float32)
    d = (x1 * sin).to(dtype).to(tl.float32)
    return (a - b).to(dtype), (c + d).to(dtype)


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
    block_size, num_q_heads, num_kv_heads, half_dim,
    Q_HEADS_P: tl.constexpr, KV_HEADS_P: tl.constexpr, HALF_P: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_P)
    dim_valid = dims < half_dim
    cos = tl.load(cos_ptr + token * stride_cos + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_sin + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]

    q_heads = tl.arange(0, Q_HEADS_P)
    q_mask = (q_heads < num_q_heads)[:, None] & dim_valid[None, :]
    q1_ptrs = q_ptr + token * stride_qt + q_heads[:, None] * stride_qh + dims[None, :]  # [Hq, D/2]
    q1 = tl.load(q1_ptrs, mask=q_mask, other=0.0)
    q2 = tl.load(q1_ptrs + half_dim, mask=q_mask, other=0.0)
    q1_out, q2_out = _rotate(q1.to(tl.float32), q2.to(tl.float32), cos, sin, q1.dtype)
    tl.store(q1_ptrs, q1_out, mask=q_mask)  # q in place: attention reads it next
    tl.store(q1_ptrs + half_dim, q2_out, mask=q_mask)

    slot = tl.load(slot_ptr + token).to(tl.int64)  # 64-bit pool offsets whatever the slots' dtype
    if slot >= 0:  # a negative slot is a padding row: nothing goes to the cache
        kv_heads = tl.arange(0, KV_HEADS_P)
        kv_mask = (kv_heads < num_kv_heads)[:, None] & dim_valid[None, :]
        k1_ptrs = k_ptr + token * stride_kt + kv_heads[:, None] * stride_kh + dims[None, :]  # [Hkv, D/2]
        k1 = tl.load(k1_ptrs, mask=kv_mask, other=0.0)
        k2 = tl.load(k1_ptrs + half_dim, mask=kv_mask, other=0.0)
        k1_out, k2_out = _rotate(k1.to(tl.float32), k2.to(tl.float32), cos, sin, k1.dtype)
        v1_ptrs = v_ptr + token * stride_vt + kv_heads[:, None] * stride_vh + dims[None, :]
        v1 = tl.load(v1_ptrs, mask=kv_mask, other=0.0)
        v2 = tl.load(v1_ptrs + half_dim, mask=kv_mask, other=0.0)
        block = slot // block_size
        offset = slot % block_size
        k_dst = k_cache_ptr + block * stride_kb + offset * stride_ks + kv_heads[:, None] * stride_kch + dims[None, :]
        v_dst = v_cache_ptr + block * stride_vb + offset * stride_vs + kv_heads[:, None] * stride_vch + dims[None, :]
        tl.store(k_dst, k1_out, mask=kv_mask)
        tl.store(k_dst + half_dim, k2_out, mask=kv_mask)
        tl.store(v_dst, v1, mask=kv_mask)
        tl.store(v_dst + half_dim, v2, mask=kv_mask)


def rotary_write_kv(
    q: torch.Tensor,  # [T, Hq, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D], left as it is: its rotated values go to the cache
    v: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, D / 2], each token's row of the rotate-half cos table
    sin: torch.Tensor,  # [T, D / 2]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, block * block_size + offset; negative = no cache write
) -> None:
    """Rotate q in place and store rotated k and plain v at each token's slot of the pool, in one launch."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    check_dtype("q", q)
    if head_dim % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {head_dim}")
    if not q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError("q, k, v and both pools must share one dtype")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache, v_cache)):
        raise ValueError("the last dimension of every tensor must be contiguous")
    if num_tokens == 0:
        return
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_q_heads, num_kv_heads, head_dim // 2,
        Q_HEADS_P=triton.next_power_of_2(num_q_heads), KV_HEADS_P=triton.next_power_of_2(num_kv_heads),
        HALF_P=triton.next_power_of_2(head_dim // 2), **LAUNCH_OPTIONS,
    )
