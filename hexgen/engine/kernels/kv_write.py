"""Write a step's keys and values into the paged pool in one launch (Triton), by flat slot numbers.

torch needs two `index_copy_` launches (keys, values) plus a copy of each source when it is a strided
view of a merged QKV output; this kernel reads the views as they are and writes both in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hexgen.engine.kernels._common import check_dtype


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
    block_size, num_kv_heads, head_dim,
    HEADS_P: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # 64-bit pool offsets whatever the slots' dtype
    if slot < 0:  # a padding row (e.g. of a CUDA graph's fixed batch) writes nothing
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_P)
    dims = tl.arange(0, HEAD_DIM_P)
    mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)  # [Hkv, D]
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    k_dst = block * stride_kb + offset * stride_ks + heads[:, None] * stride_kch + dims[None, :]
    v_dst = block * stride_vb + offset * stride_vs + heads[:, None] * stride_vch + dims[None, :]
    tl.store(k_cache_ptr + k_dst, k, mask=mask)
    tl.store(v_cache_ptr + v_dst, v, mask=mask)


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, block * block_size + offset; negative = skip the row
) -> None:
    """k_cache[slot // block_size, slot % block_size] = k[t] (and v likewise) for every token t, in place."""
    num_tokens, num_kv_heads, head_dim = k.shape
    check_dtype("k", k)
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"k/v dtype {k.dtype}/{v.dtype} differs from the pool's {k_cache.dtype}/{v_cache.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dimension of k, v and both pools must be contiguous")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_kv_heads, head_dim,
        HEADS_P=triton.next_power_of_2(num_kv_heads), HEAD_DIM_P=triton.next_power_of_2(head_dim),
    )
