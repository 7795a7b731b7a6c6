"""Paged attention in one launch per layer for a ragged batch of prefill chunks and decodes (Triton).

Sequence b has n_b = query_start[b+1] - query_start[b] new query tokens; its keys and values, these
tokens' included, already sit in the block pool. Query i (0-based among the n_b) is at cache position
context_lens[b] - n_b + i and attends causally to positions 0..that position. Position p of sequence b
lives in block block_tables[b, p // block_size] at offset p % block_size.

One program handles one tile of BLOCK_Q query tokens of one sequence and one key-value head: the rows of its
score matrix are (query token, query head of that kv head's group) pairs, so a decode step with GQA still
fills the 16 rows a tensor-core product needs. Keys are visited in tiles of BLOCK_N positions with an
online softmax (FlashAttention's rescaling), in base 2, accumulating in float32; the whole key tiles before a
query tile's first position skip the causal mask, only the tiles on its diagonal apply it. How many rows and keys
a tile has, and the launch's warps and pipeline stages (`Tiles`), each GPU times for itself at start-up among a
few candidates that compile without spilling registers (attention_tuning.py).

The grid is flat over query tiles, T // BLOCK_Q + B of them: sequence b owns the tiles from
query_start[b] // BLOCK_Q + b on (at least the ceil(n_b / BLOCK_Q) it needs), and a program finds its
sequence by binary search. A 2,000-token prompt chunk beside 60 decodes thus launches ~190 programs per
head, not 60 x 2,000 / BLOCK_Q mostly idle ones.

A decode step of few sequences over long contexts can split each sequence's keys into `num_kv_splits`
ranges handled by separate programs (flash-decoding), so that more than B x Hkv programs share the GPU; a
second, small launch merges the ranges by their log-sum-exp. `choose_kv_splits` says when that pays.

Why a kernel of our own: torch 2.13's own paged FlashAttention (torch.nn.attention.varlen.varlen_attn with a
block_table, FlashAttention-2 inside) takes pages of a multiple of 256 tokens only, against this engine's 16-token
blocks (the prefix cache shares whole blocks; 256-token pages would leave up to 255 slots of a sequence unused), and
this kernel runs on CPU under Triton's interpreter, so the whole CUDA path is tested without a GPU. FlashInfer has
not been measured against it. On the H200 (2026-11-30, before the unmasked key tiles and the timed choice of
tiles) this kernel trailed torch's flash SDPA over contiguous keys by 12-20% at decode and 2.4x on a 2,048-token
prefill (docs/bench-gpu.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hexgen.engine.kernels._common import check_dtype, dots_in_fp32


@dataclass(frozen=True)
class Tiles:
    """How the kernel cuts a step's work: score rows per program (query tokens x the query heads of one kv head;
    raised to the group size where that is larger), key positions per tile, and the launch's warps and software
    pipeline stages."""

    rows: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return f"{self.rows} rows x {self.block_n} keys, {self.num_warps} warps, {self.num_stages} stages"


# Candidates per kind of step, the first the default until a GPU's own timings choose (attention_tuning.py). Each
# compiles for sm_90 without spilling registers at the Llama-3-8B shape (tests/kernels/compile_for_gpu.py); 16 rows
# is the tensor-core minimum, so a decode step with GQA fills them with one token's query heads.
DECODE_TILES = (Tiles(16, 64), Tiles(16, 128), Tiles(16, 64, num_warps=8))
PREFILL_TILES = (Tiles(64, 64), Tiles(128, 64, num_warps=8), Tiles(64, 64, num_stages=2))
# float32 products on CUDA run on the FMA units, and 64 rows of them spill registers: prefill tiles stay small.
FP32_TILES = Tiles(16, 64)
MAX_KV_SPLITS = 16
SPLIT_MIN_POSITIONS = 256  # keys per split at least: below that the merge launch costs more than it saves


@triton.jit
def _sequence_of_tile(query_start_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first tile, query_start[b] // BLOCK_Q + b, is at or before `tile`."""
    lo = 0
    hi = num_seqs  # first tile of lo <= tile < first tile of hi (hi = num_seqs: past the end)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first_tile <= tile, mid, lo)
        hi = tl.where(first_tile <= tile, hi, mid)
    return lo


@triton.jit
def _attend_key_tile(
    q, acc, l_i, m_i, start, kv_end, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, block_size, kv_head,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, dims, dim_valid,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, MASKED: tl.constexpr,
):
    """Fold the key positions start..start+BLOCK_N into the online softmax of the rows of q. MASKED: the tile
    reaches a row's own position or kv_end, so positions past either are hidden; otherwise every row sees all."""
    pos = start + tl.arange(0, BLOCK_N)  # [N]
    if MASKED:
        pos_valid = pos < kv_end
        block = tl.load(block_table_ptr + pos // block_size, mask=pos_valid, other=0)
        kv_mask = pos_valid[:, None] & dim_valid[None, :]
    else:
        block = tl.load(block_table_ptr + pos // block_size)
        kv_mask = dim_valid[None, :]
    block = block.to(tl.int64)  # a large pool overflows int32 element offsets
    offset = pos % block_size
    k_offsets = block * stride_kb + offset * stride_ks + kv_head * stride_kh
    k = tl.load(k_cache_ptr + k_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
    if DOT_FP32:
        k = k.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [M, N]
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & pos_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
    p = tl.exp2(scores - m_new[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    v_offsets = block * stride_vb + offset * stride_vs + kv_head * stride_vh
    v = tl.load(v_cache_ptr + v_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
    if DOT_FP32:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, l_i, m_new


# The block-table row stride (the batch's longest table), the batch's sequences and its key splits change from step
# to step; specialising on them (triton does for values of 1 and multiples of 16) would compile new variants in the
# middle of serving, a second or more each.
@triton.jit(do_not_specialize=["stride_bt", "num_seqs", "num_splits"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr,
    partial_ptr, lse_ptr,  # split-KV only: float32 [T, Hq, S, D] outputs and [T, Hq, S] log2-sum-exp2 per range
    scale_log2,  # softmax scale * log2(e): exp2 of scaled scores equals exp of the true ones
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt, block_size, num_seqs,
    num_splits,  # key ranges per sequence (1: no split); a value, not a constant, so 1-16 share one binary
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _sequence_of_tile(query_start_ptr, num_seqs, tile, BLOCK_Q)
    q_begin = tl.load(query_start_ptr + seq)
    n_new = tl.load(query_start_ptr + seq + 1) - q_begin
    q_tile = tile - (q_begin // BLOCK_Q + seq)  # this program's tile among its sequence's
    if q_tile * BLOCK_Q >= n_new:  # a spare tile slot, or a padding sequence with no tokens
        return
    context = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_Q * GROUP_P)
    token = q_tile * BLOCK_Q + rows // GROUP_P  # [M] index among this sequence's new tokens
    head_in_group = rows % GROUP_P
    row_valid = (token < n_new) & (head_in_group < GROUP)
    q_head = kv_head * GROUP + head_in_group
    q_pos = context - n_new + token  # [M] cache position of each row's query
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < HEAD_DIM

    q_offsets = (q_begin + token)[:, None] * stride_qt + q_head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)  # [M, D]
    if DOT_FP32:
        q = q.to(tl.float32)

    # Every row sees the first position of its range (position 0, or with splits a decode's whole range), so
    # its running max is finite after the first tile; an empty split range leaves m_i = -inf and l_i = 0.
    m_i = tl.full([BLOCK_Q * GROUP_P], float("-inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_Q * GROUP_P], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_Q * GROUP_P, HEAD_DIM_P], dtype=tl.float32)
    kv_end = tl.minimum(context, context - n_new + (q_tile + 1) * BLOCK_Q)  # last query's position + 1
    kv_begin = 0
    if SPLIT:  # this program's range: whole tiles, the last range possibly shorter or empty
        per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        kv_begin = split * per_split
        kv_end = tl.minimum(kv_end, kv_begin + per_split)
    # Keys before this tile's first query are visible to every row: those whole tiles skip the causal mask and
    # the bounds checks; only the tiles from there on (the diagonal, at most ceil(BLOCK_Q / BLOCK_N) + 1) mask.
    first_query_pos = context - n_new + q_tile * BLOCK_Q
    unmasked_end = tl.maximum(kv_begin, tl.minimum(kv_end, first_query_pos // BLOCK_N * BLOCK_N))
    for start in range(kv_begin, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attend_key_tile(
            q, acc, l_i, m_i, start, kv_end, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt,
            block_size, kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, dims,
            dim_valid, BLOCK_N, DOT_FP32, False)
    for start in range(unmasked_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_key_tile(
            q, acc, l_i, m_i, start, kv_end, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt,
            block_size, kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, dims,
            dim_valid, BLOCK_N, DOT_FP32, True)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = row_valid[:, None] & dim_valid[None, :]
    if not SPLIT:
        out_offsets = (q_begin + token)[:, None] * stride_ot + q_head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        lse_offsets = ((q_begin + token) * (GROUP * tl.num_programs(1)) + q_head) * num_splits + split  # [M]
        tl.store(partial_ptr + lse_offsets[:, None].to(tl.int64) * HEAD_DIM + dims[None, :], out, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + lse_offsets, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr, stride_ot, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """out[t, h] = sum_s 2^(lse_s - max) partial_s / sum_s 2^(lse_s - max), over the key ranges s."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, HEAD_DIM_P)
    row = token * tl.num_programs(1) + head
    lse = tl.load(lse_ptr + row * num_splits + splits, mask=splits < num_splits, other=float("-inf"))  # [S]
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [S]; all zero for a context-0 padding row
    mask = (splits < num_splits)[:, None] & (dims < HEAD_DIM)[None, :]
    partial = tl.load(partial_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :], mask=mask,
                      other=0.0)  # [S, D]
    total = tl.sum(weight, 0)
    out = tl.sum(partial * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


TilesKey = tuple  # (device, dtype, query heads, kv heads, head dim, block size, decode-only step)
_chosen: dict[TilesKey, Tiles] = {}  # what attention_tuning measured fastest on this process's GPUs


def tiles_key(device: torch.device, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, decode: bool) -> TilesKey:
    return (str(device), dtype, num_q_heads, num_kv_heads, head_dim, block_size, decode)


def choose_tiles(key: TilesKey, tiles: Tiles) -> None:
    """Launch every later call with this key in `tiles` (the tuner's choice)."""
    _chosen[key] = tiles


def candidate_tiles(dtype: torch.dtype, device: torch.device, decode: bool) -> tuple[Tiles, ...]:
    """The tilings worth timing for this dtype and device, the default first."""
    if dtype == torch.float32 and device.type == "cuda":
        return (FP32_TILES,)
    return DECODE_TILES if decode else PREFILL_TILES


def tiles_for(q: torch.Tensor, k_cache: torch.Tensor, decode: bool) -> Tiles:
    """The tuned tiles for this call's shape and device, else the default."""
    _, block_size, num_kv_heads, _ = k_cache.shape
    key = tiles_key(q.device, q.dtype, q.shape[1], num_kv_heads, q.shape[2], block_size, decode)
    return _chosen.get(key) or candidate_tiles(q.dtype, q.device, decode)[0]


def choose_kv_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Key ranges per sequence for a decode step on `device` (1 off CUDA): see kv_splits_for."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return kv_splits_for(num_seqs, num_kv_heads, max_context_len, sms)


def kv_splits_for(num_seqs: int, num_kv_heads: int, max_context_len: int, multiprocessors: int) -> int:
    """Key ranges per sequence for a decode step: enough programs for about two per SM, each range >= 256 keys of
    `max_context_len`. A CUDA graph fixes the count at capture from the context limit, so a replayed step of short
    sequences runs ranges that are mostly empty (they add nothing: weight 0 in the merge)."""
    wanted = -(-2 * multiprocessors // (num_seqs * num_kv_heads))
    return max(1, min(MAX_KV_SPLITS, wanted, max_context_len // SPLIT_MIN_POSITIONS))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D], rows of sequence b at query_start[b]:query_start[b+1]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    query_start: torch.Tensor,  # [B + 1] int32, cumulative count of new tokens
    context_lens: torch.Tensor,  # [B] int32, cached tokens per sequence after this step's write
    max_query_len: int,
    scale: float,
    num_kv_splits: int = 1,  # > 1 only for decode steps (max_query_len 1): see choose_kv_splits
    tiles: Tiles | None = None,  # None: the tuned or default tiles for this shape (tiles_for)
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's paged cache, in one launch (two with key
    splits); returns [T, Hq, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_dtype("q", q)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} key-value heads")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dimension of q, k_cache and v_cache must be contiguous")
    if num_kv_splits > 1 and max_query_len != 1:
        raise ValueError(f"num_kv_splits={num_kv_splits} needs a decode-only step (max_query_len 1)")
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = context_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    tiles = tiles or tiles_for(q, k_cache, decode=max_query_len == 1)
    rows = max(tiles.rows, group_p)
    block_q = rows // group_p
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_kv_splits)
    partial = lse = out  # unused without splits
    if num_kv_splits > 1:
        partial = torch.empty((num_tokens, num_q_heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_tokens, num_q_heads, num_kv_splits), dtype=torch.float32, device=q.device)
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start, context_lens, partial, lse,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0), block_size, num_seqs, num_kv_splits,
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        BLOCK_Q=block_q, BLOCK_N=tiles.block_n, DOT_FP32=dots_in_fp32(q), SPLIT=num_kv_splits > 1,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if num_kv_splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            partial, lse, out, out.stride(0), out.stride(1), num_kv_splits,
            HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, SPLITS_P=triton.next_power_of_2(MAX_KV_SPLITS),
        )
    return out
