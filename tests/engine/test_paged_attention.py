"""Batched paged attention vs a per-sequence reference on ragged mixes; one op count whatever the batch size."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hexgen.engine import attention, cpu_attention
from hexgen.engine.attention import LayerPool, build_metadata, paged_attention, write_kv
from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.engine import build_runner, init_rank
from hexgen.engine.kv_budget import RankShape, kv_bytes_per_block, rank_weight_bytes
from hexgen.engine.messages import SampleRow, StepPlan
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.launch.spec import Layout, RankSpec


def ragged_plan(rng: random.Random, starts: list[int], lengths: list[int], block_size: int, num_blocks: int):
    """A plan whose sequences own shuffled, disjoint blocks covering start + length tokens."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for s, n in zip(starts, lengths, strict=True):
        tables.append([free.pop() for _ in range(-(-(s + n) // block_size))])
    tokens = [rng.randrange(100) for _ in range(sum(lengths))]
    return StepPlan(seq_ids=list(range(len(starts))), starts=starts, lengths=lengths, token_ids=tokens,
                    block_tables=tables, sample=[True] * len(starts))


def reference_attention(q, k_new, v_new, history, plan, scale):
    """Per sequence: its cached prefix + new keys, explicit causal mask, SDPA on one sequence at a time."""
    out, offset = [], 0
    for b, (s, n) in enumerate(zip(plan.starts, plan.lengths, strict=True)):
        keys = torch.cat([history[b][0], k_new[offset:offset + n]])  # [s + n, kv, d]
        values = torch.cat([history[b][1], v_new[offset:offset + n]])
        mask = torch.arange(s + n).unsqueeze(0) <= (s + torch.arange(n)).unsqueeze(1)  # [n, s + n]
        o = F.scaled_dot_product_attention(
            q[offset:offset + n].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True)
        out.append(o.transpose(0, 1))
        offset += n
    return torch.cat(out)


@pytest.mark.parametrize(("starts", "lengths", "block_size", "heads", "kv_heads"), [
    ([5, 0, 17, 3], [1, 1, 1, 1], 4, 4, 2),  # decode only
    ([0, 0, 0], [7, 1, 16], 8, 6, 3),  # prefill only, one of them a single token
    ([12, 0, 31, 8, 0], [1, 9, 1, 5, 4], 4, 4, 1),  # chunks after a cached prefix, mixed with decodes
    ([15, 16, 0], [1, 16, 32], 16, 2, 2),  # block boundaries: the token that opens / fills a block
    ([0, 20, 0, 7, 40], [6, 1, 3, 1, 1], 4, 6, 2),  # decodes after and between chunks: two groups, rows interleaved
    ([0, 0, 0], [3, 13, 9], 4, 4, 2),  # fresh prompts of unequal lengths: padded queries, tables of unequal lengths
])
# the gather path's two ways for decodes; the CPU kernel as built here, and built for AVX2
@pytest.mark.parametrize("decodes", ["matmuls", "sdpa", "kernel", "kernel-avx2"])
def test_batched_attention_matches_per_sequence(starts, lengths, block_size, heads, kv_heads, decodes, monkeypatch):
    monkeypatch.setattr(attention, "MATMUL_DECODE_MIN_KEYS", 0 if decodes == "matmuls" else 10**9)
    kernel = None
    if decodes.startswith("kernel"):
        if decodes == "kernel-avx2" and not cpu_attention.load().limits.vector_width == 16:
            pytest.skip("no AVX-512 here: the native build is the AVX2 one")
        kernel = cpu_attention.load(("-mno-avx512f",) if decodes == "kernel-avx2" else ())
        if kernel is None:
            pytest.skip("no C compiler built the CPU attention kernel here")
        kernel = dataclasses.replace(kernel, group=heads // kv_heads)
    rng = random.Random(sum(starts) + len(lengths))
    gen = torch.Generator().manual_seed(7)
    d, num_blocks = 8, 64
    plan = ragged_plan(rng, starts, lengths, block_size, num_blocks)
    # head-major blocks: block, then key heads and value heads, then offset in the block
    pool = torch.zeros(num_blocks, 2, kv_heads, block_size, d)
    history = []
    for s, table in zip(starts, plan.block_tables, strict=True):  # the cached prefix, written where it belongs
        kv = torch.randn(2, s, kv_heads, d, generator=gen)
        for p in range(s):
            pool[table[p // block_size], :, :, p % block_size] = kv[:, p]
        history.append(kv)
    total = sum(lengths)
    q = torch.randn(total, heads, d, generator=gen)
    k_new, v_new = torch.randn(2, total, kv_heads, d, generator=gen)
    meta = build_metadata(plan, block_size, torch.device("cpu"), use_kernel=False, kv_heads=kv_heads,
                          attention_kernel=kernel)
    # the kernel takes the whole step in one call, every sequence a tile or tiles (a decode: one token), the
    # costliest first; the gather path attends decodes and chunks apart
    if kernel is not None:
        assert [type(g) for g in meta.groups] == [attention.KernelGroup]
        tile = kernel.limits.tile_rows // (heads // kv_heads)
        tasks = meta.groups[0].tasks.tolist()  # (first row, tokens, sequence, position)
        assert sorted((b, n) for _, n, b, _ in tasks) == sorted(
            (b, min(tile, n - i)) for b, n in enumerate(lengths) for i in range(0, n, tile))
        assert sorted(r for first, n, _, _ in tasks for r in range(first, first + n)) == list(range(sum(lengths)))
    else:
        assert [g.max_query_len == 1 for g in meta.groups] == [True] * (1 in lengths) + [False] * (max(lengths) > 1)
        # chunks that all begin their prompts take SDPA's own causal mask (no mask tensor), the others an explicit one
        chunk_starts = [st for st, n in zip(starts, lengths, strict=True) if n > 1]
        if chunk_starts:
            assert (meta.groups[-1].mask is None) == (max(chunk_starts) == 0)
    layer_pool = LayerPool.of(pool.view(num_blocks, -1), block_size, kv_heads, d, head_major=True)
    write_kv(layer_pool, torch.cat([k_new, v_new], dim=1), meta)  # [T, 2 kv_heads, d]
    offset = 0  # the new keys and values landed where the hand-made layout puts them
    for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        for i in range(n):
            p = s + i
            stored = pool[plan.block_tables[b][p // block_size], :, :, p % block_size]
            torch.testing.assert_close(stored, torch.stack([k_new[offset + i], v_new[offset + i]]))
        offset += n
    ours = paged_attention(q, layer_pool, meta, d**-0.5)
    torch.testing.assert_close(ours, reference_attention(q, k_new, v_new, history, plan, d**-0.5))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_decode_step_ops_do_not_grow_with_batch(tiny_model_dirs):
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    spec = RankSpec(source, Layout((1,), ((0, source.spec.num_layers),)), 0)
    runner = build_runner(spec, init_rank(spec), SchedulerConfig(max_running_seqs=16, num_kv_blocks=64, block_size=4))
    assert (runner.attention_kernel is None) == (cpu_attention.load() is None)  # the kernel where built
    counts = {}
    for batch in (16, 1, 16):  # the first pass fills the RoPE tables (once per process), so it is not counted
        plan = ragged_plan(random.Random(batch), [3 + b % 5 for b in range(batch)], [1] * batch, 4, 64)
        plan.sampling = [SampleRow(0.7, 5, 0.9, b, 4) for b in range(batch)]  # sampled, not greedy
        with OpCounter() as ops:
            hidden, last_rows = runner.forward(plan, None)
            runner.sample(plan, hidden, last_rows)
        counts[batch] = ops.count
    assert counts[1] == counts[16], counts


def test_weight_and_block_bytes_match_the_loaded_stage(tiny_model_dirs):
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    layers = source.spec.num_layers
    spec = RankSpec(source, Layout((1,), ((0, layers),)), 0)
    runner = build_runner(spec, init_rank(spec), SchedulerConfig(max_running_seqs=2, num_kv_blocks=3, block_size=8))
    shape = RankShape(layers, 1, True, True)
    assert rank_weight_bytes(source.spec, shape, 4, cpu_packed=True) == runner.stage.weight_bytes()
    pool = runner.stage.kv_pool
    assert kv_bytes_per_block(source.spec, shape, 8, 4) * 3 == pool.numel() * pool.element_size()
