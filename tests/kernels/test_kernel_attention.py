"""Paged attention kernel vs a per-sequence SDPA reference on ragged mixes of prefill chunks and decodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# (new tokens, context length after the write) per sequence
DECODE_ONLY = [(1, 1), (1, 16), (1, 17), (1, 63), (1, 64), (1, 65), (1, 97)]
PREFILL_ONLY = [(5, 5), (16, 16), (33, 33), (70, 70)]
MIXED = [(1, 40), (20, 52), (1, 1), (64, 64), (3, 3), (1, 129), (24, 170), (10, 72)]  # (20, 52): a chunk after 32
# cached tokens; (24, 170): after 146, so its tiles see whole key tiles before the diagonal ones; (10, 72): its first
# query at position 62, the last but one of a key tile
# Sequences with no tokens (a CUDA graph's padding rows) and chunks of exactly 1 and 2 query tiles (16 tokens
# each at GQA 4), so the flat grid's tile-to-sequence search meets every boundary case.
PADDED = [(0, 0), (3, 10), (0, 0), (16, 40), (1, 5), (32, 32), (17, 50), (0, 0)]
PADDED_DECODE = [(1, 7), (0, 0), (1, 20), (0, 0)]

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_batch(lengths, block_size, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """Random q, a pool whose blocks are handed out in shuffled order, and the batch's index tensors."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, -(-ctx // block_size)) for _, ctx in lengths]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lengths), max(blocks_per_seq)), -1, dtype=torch.int32)  # unused entries: -1
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = order[used : used + n]
        used += n
    pool_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(pool_shape, generator=gen).to(dtype)
    v_cache = torch.randn(pool_shape, generator=gen).to(dtype)
    num_tokens = sum(n for n, _ in lengths)
    q = torch.randn((num_tokens, num_q_heads, head_dim), generator=gen).to(dtype)
    query_start = torch.tensor([0] + [n for n, _ in lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    context_lens = torch.tensor([ctx for _, ctx in lengths], dtype=torch.int32)
    tensors = q, k_cache, v_cache, tables, query_start, context_lens
    return tuple(t.to(device) for t in tensors)


def reference(q, k_cache, v_cache, tables, query_start, context_lens, scale):
    """Per sequence: gather its keys through the block table, SDPA in float32 with an explicit causal mask."""
    q, k_cache, v_cache = q.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu()
    tables, query_start, context_lens = tables.cpu(), query_start.cpu(), context_lens.cpu()
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(len(context_lens)):
        begin, end, ctx = int(query_start[b]), int(query_start[b + 1]), int(context_lens[b])
        if begin == end:
            continue
        pos = torch.arange(ctx)
        blocks = tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = v_cache[blocks, pos % block_size].repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - (end - begin), ctx)
        mask = pos[None, :] <= q_pos[:, None]  # [n, ctx]
        attn = F.scaled_dot_product_attention(
            q[begin:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[begin:end] = attn.transpose(0, 1)
    return out


def run_case(device, lengths, block_size, num_q_heads, num_kv_heads, head_dim, dtype, num_kv_splits=1, tiles=None):
    from hexgen.engine.kernels import paged_attention

    batch = make_batch(lengths, block_size, num_q_heads, num_kv_heads, head_dim, dtype, device)
    scale = head_dim**-0.5
    out = paged_attention(*batch, max_query_len=max(n for n, _ in lengths), scale=scale, num_kv_splits=num_kv_splits,
                          tiles=tiles)
    assert out.shape == batch[0].shape and out.dtype == dtype and out.device == batch[0].device
    expected = reference(*batch, scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float().cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("lengths", [DECODE_ONLY, PREFILL_ONLY, MIXED], ids=["decode", "prefill", "mixed"])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (6, 2), (8, 2)], ids=["gqa1", "gqa3", "gqa4"])
def test_ragged_mixes_and_gqa(device, lengths, num_q_heads, num_kv_heads):
    run_case(device, lengths, 16, num_q_heads, num_kv_heads, 32, torch.float32)


def every_tiling():
    from hexgen.engine.kernels.attention import DECODE_TILES, FP32_TILES, PREFILL_TILES

    return [*DECODE_TILES, *PREFILL_TILES, FP32_TILES]


@pytest.mark.parametrize("tiles", every_tiling(), ids=str)
@pytest.mark.parametrize("lengths", [DECODE_ONLY, MIXED], ids=["decode", "mixed"])
def test_every_candidate_tiling(device, lengths, tiles):
    """Whatever tiles a GPU's timings choose (attention_tuning.py), the output is the same attention; GQA 3 pads
    each kv head's rows to 4, and splits exercise the 128-key tiles' ranges."""
    run_case(device, lengths, 16, 6, 2, 32, torch.float32, tiles=tiles)
    if lengths is DECODE_ONLY:
        run_case(device, lengths + [(1, 300)], 16, 6, 2, 32, torch.float32, num_kv_splits=3, tiles=tiles)


@pytest.mark.parametrize("lengths", [PADDED, PADDED_DECODE], ids=["mixed", "decode"])
def test_sequences_without_tokens(device, lengths):
    run_case(device, lengths, 16, 8, 2, 32, torch.float32)


def test_graph_padding_rows_give_zeros(device):
    """A CUDA graph pads its batch with one-token sequences of context 0: their rows come out 0, not NaN."""
    from hexgen.engine.kernels import paged_attention

    q, k_cache, v_cache, tables, _, _ = make_batch([(1, 20), (1, 1), (1, 1)], 16, 4, 2, 32, torch.float32, device)
    query_start = torch.arange(4, dtype=torch.int32, device=device)
    context_lens = torch.tensor([20, 0, 0], dtype=torch.int32, device=device)
    for splits in (1, 3):
        out = paged_attention(q, k_cache, v_cache, tables, query_start, context_lens, 1, 0.2, splits)
        assert torch.equal(out[1:], torch.zeros_like(out[1:])) and out[0].abs().sum() > 0


@pytest.mark.parametrize("num_kv_splits", [2, 5])
def test_decode_with_key_splits(device, num_kv_splits):
    """Key ranges are whole 64-position tiles: most ranges of the short contexts here are empty."""
    run_case(device, PADDED_DECODE + [(1, 17), (1, 65), (1, 300)], 16, 8, 2, 32, torch.float32, num_kv_splits)


def test_key_splits_refuse_prefill(device):
    with pytest.raises(ValueError, match="decode-only"):
        run_case(device, MIXED, 16, 8, 2, 32, torch.float32, num_kv_splits=2)


def test_no_key_splits_off_cuda():
    from hexgen.engine.kernels.attention import choose_kv_splits

    assert choose_kv_splits(1, 8, 8192, torch.device("cpu")) == 1


def test_key_splits_fill_the_multiprocessors_in_ranges_of_256_keys_or_more():
    """An H200's 132 SMs: one sequence over 8 KV heads wants 33 ranges (two programs per SM), held to 16; two
    sequences over 1,000 keys want 17, held to 3 ranges of >= 256; 64 sequences fill the SMs unsplit."""
    from hexgen.engine.kernels.attention import kv_splits_for

    assert kv_splits_for(1, 8, 8192, 132) == 16
    assert kv_splits_for(2, 8, 1000, 132) == 3
    assert kv_splits_for(2, 8, 255, 132) == 1
    assert kv_splits_for(64, 8, 8192, 132) == 1
    assert kv_splits_for(4, 8, 8192, 132) == 9  # ceil(264 / 32)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_block_sizes(device, block_size):
    run_case(device, MIXED, block_size, 4, 1, 32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(device, dtype):
    run_case(device, MIXED, 16, 6, 2, 64, dtype)


def test_head_dim_not_power_of_two(device):
    run_case(device, MIXED, 16, 3, 1, 24, torch.float32)


def test_strided_q_from_merged_projection(device):
    """q may be a view of a merged QKV output: rows strided by the whole projection width."""
    from hexgen.engine.kernels import paged_attention

    q, *rest = make_batch(MIXED, 16, 4, 2, 32, torch.float32, device)
    qkv = torch.cat([q.flatten(1), torch.zeros(q.shape[0], 2 * 2 * 32, device=device)], dim=1)
    q_view = qkv[:, : 4 * 32].view(-1, 4, 32)
    assert not q_view.is_contiguous()
    out = paged_attention(q_view, *rest, max_query_len=64, scale=0.2)
    torch.testing.assert_close(out, paged_attention(q, *rest, max_query_len=64, scale=0.2))


@pytest.mark.gpu
def test_llama3_8b_shape_decode_and_prefill():
    """The shape the benchmark runs: 32 query heads over 8 kv heads, head_dim 128, bf16, long contexts."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lengths = [(1, 1000)] * 24 + [(1, 4097), (256, 256), (128, 700)]
    run_case(torch.device("cuda"), lengths, 16, 32, 8, 128, torch.bfloat16)
    for tiles in every_tiling():  # each tiling the tuner may choose, at this shape on this card
        run_case(torch.device("cuda"), lengths, 16, 32, 8, 128, torch.bfloat16, tiles=tiles)
    from hexgen.engine.kernels.attention import choose_kv_splits

    splits = choose_kv_splits(1, 8, 4097, torch.device("cuda"))
    assert splits > 1
    run_case(torch.device("cuda"), [(1, 4097)], 16, 32, 8, 128, torch.bfloat16, splits)
