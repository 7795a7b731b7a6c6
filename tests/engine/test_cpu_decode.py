"""The CPU decode-attention kernel (hexgen/engine/cpu_decode.py) against brute force in float64, and its
fall-backs: switched off, or no compiler that builds it."""

from __future__ import annotations

import random

import pytest
import torch

from hexgen.engine import cpu_decode


@pytest.fixture(scope="module")
def kernel():
    built = cpu_decode.load()
    if built is None:
        pytest.skip("no C compiler built the CPU decode kernel here")
    return built


def random_case(seed: int, contexts: list[int], kv_heads: int, group: int, head_dim: int, block_size: int,
                dtype: torch.dtype):
    """A head-major pool [blocks, 2 kv_heads * block_size * d] with shuffled disjoint blocks per sequence, the
    queries [b, h, d], padded int64 tables and context lengths."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    counts = [-(-c // block_size) for c in contexts]
    free = list(range(sum(counts) + 3))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in counts]
    pool = torch.randn(len(free) + sum(counts), 2 * kv_heads * block_size * head_dim, generator=gen).to(dtype)
    q = torch.randn(len(contexts), kv_heads * group, head_dim, generator=gen).to(dtype)
    padded = torch.tensor([t + [0] * (max(counts) - len(t)) for t in tables], dtype=torch.int64)
    return pool, q, tables, padded, torch.tensor(contexts, dtype=torch.int64)


def brute_force(pool, q, tables, contexts, kv_heads, block_size, scale):
    """Each sequence alone, in float64: its blocks' keys and values laid end to end, cut at its context, then the
    softmax of each query head against its KV head (query heads h*g .. h*g+g-1 share KV head h)."""
    head_dim = q.shape[-1]
    blocks = pool.double().view(pool.shape[0], 2, kv_heads, block_size, head_dim)
    out = []
    for b, (table, context) in enumerate(zip(tables, contexts, strict=True)):
        keys = torch.cat([blocks[t, 0] for t in table], dim=1)[:, :context]  # [kv_heads, context, d]
        values = torch.cat([blocks[t, 1] for t in table], dim=1)[:, :context]
        query = q[b].double().view(kv_heads, -1, head_dim)  # [kv_heads, g, d]
        weights = torch.softmax(query @ keys.transpose(1, 2) * scale, dim=-1)
        out.append((weights @ values).reshape(-1, head_dim))
    return torch.stack(out)


@pytest.mark.parametrize(("contexts", "kv_heads", "group", "head_dim", "block_size"), [
    ([1, 16, 17, 32, 33, 5], 2, 3, 8, 16),  # one key; a block filled exactly; the key that opens the next block
    ([300, 1, 129], 3, 3, 64, 32),  # SmolLM2's heads: long and short in one step
    ([64, 65], 1, 16, 32, 1),  # blocks of one token; the largest query group (rows not unrolled)
    ([200], 4, 1, 128, 256),  # no grouping; one block of the largest size
    ([90, 3], 2, 8, 16, 16),  # the largest group whose rows are unrolled
    ([40], 1, 9, 8, 16),  # the smallest group whose rows are not
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_brute_force(kernel, contexts, kv_heads, group, head_dim, block_size, dtype):
    pool, q, tables, padded, lengths = random_case(len(contexts) + head_dim, contexts, kv_heads, group, head_dim,
                                                   block_size, dtype)
    scale = head_dim**-0.5
    assert kernel.supports(dtype, group, head_dim, block_size)
    ours = kernel(q, pool, padded, torch.arange(len(contexts)), lengths, kv_heads, block_size, scale)
    assert ours.dtype == dtype and ours.shape == q.shape
    expected = brute_force(pool, q, tables, contexts, kv_heads, block_size, scale)
    # fp32: the sums' order only; bf16: inputs as stored, fp32 inside, the output rounded once (2^-8 relative)
    tolerance = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 8e-3)}[dtype]
    torch.testing.assert_close(ours.double(), expected, rtol=tolerance[0], atol=tolerance[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_of_one_sequence_each_see_their_own_prefix(kernel, dtype):
    """Several query tokens of a sequence (a decode with drafts): token i of sequence b sees its first
    context[b] - (tokens of b) + i + 1 keys, each token checked against brute force over that prefix alone."""
    contexts, kv_heads, group, head_dim, block_size = [70, 33, 5], 2, 4, 16, 16
    pool, _, tables, padded, _ = random_case(9, contexts, kv_heads, group, head_dim, block_size, dtype)
    per_sequence = [3, 1, 5]  # the last tokens of each sequence's context are the step's queries
    token_seq = torch.tensor([b for b, n in enumerate(per_sequence) for _ in range(n)])
    sees = torch.tensor([c - n + i + 1 for c, n in zip(contexts, per_sequence, strict=True) for i in range(n)])
    q = torch.randn(len(token_seq), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours = kernel(q, pool, padded, token_seq, sees, kv_heads, block_size, 0.25)
    for t, (b, keys) in enumerate(zip(token_seq.tolist(), sees.tolist(), strict=True)):
        expected = brute_force(pool, q[t:t + 1], [tables[b]], [keys], kv_heads, block_size, 0.25)[0]
        tolerance = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(ours[t].double(), expected, rtol=tolerance, atol=tolerance)


def test_the_output_does_not_depend_on_the_thread_count(kernel):
    """Each (sequence, KV head) pair is summed by one thread in one order: bit-identical on 1 or 2 threads."""
    pool, q, _, padded, lengths = random_case(3, [700, 33, 1, 260], 3, 3, 64, 32, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernel(q, pool, padded, torch.arange(4), lengths, 3, 32, 0.125)
        torch.set_num_threads(2)
        shared = kernel(q, pool, padded, torch.arange(4), lengths, 3, 32, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)


def test_a_profile_shows_each_call_as_one_op(kernel):
    """`hexgen bench engine` counts a CPU step's top-level ops and their time under torch.profiler."""
    pool, q, _, padded, lengths = random_case(5, [40, 9], 2, 2, 8, 16, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        kernel(q, pool, padded, torch.arange(2), lengths, 2, 16, 0.3)
        kernel(q, pool, padded, torch.arange(2), lengths, 2, 16, 0.3)
    calls = [e for e in prof.events() if e.name == cpu_decode.PROFILE_NAME]
    assert len(calls) == 2 and all(e.cpu_parent is None for e in calls)


def test_shapes_past_the_limits_take_the_gather_path(kernel):
    cpu = torch.device("cpu")
    assert cpu_decode.decode_kernel_for(cpu, torch.float32, 9, 3, 64, 32) is kernel
    assert cpu_decode.decode_kernel_for(cpu, torch.float16, 9, 3, 64, 32) is None  # fp16: not built for
    assert cpu_decode.decode_kernel_for(cpu, torch.float32, 34, 2, 64, 32) is None  # group of 17
    assert cpu_decode.decode_kernel_for(cpu, torch.float32, 9, 3, 512, 32) is None
    assert cpu_decode.decode_kernel_for(cpu, torch.float32, 9, 3, 60, 32) is None  # not a multiple of 8
    assert cpu_decode.decode_kernel_for(cpu, torch.float32, 9, 3, 64, 512) is None
    assert cpu_decode.decode_kernel_for(torch.device("meta"), torch.float32, 9, 3, 64, 32) is None


def test_switched_off_or_unbuildable_it_is_not_used(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(cpu_decode.DISABLE_ENV, "0")
    cpu_decode.load.cache_clear()
    try:
        assert cpu_decode.load() is None
        monkeypatch.delenv(cpu_decode.DISABLE_ENV)
        monkeypatch.setenv("HEXGEN_CACHE_DIR", str(tmp_path))  # nothing cached: it must build
        monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
        cpu_decode.load.cache_clear()
        assert cpu_decode.load() is None
        assert "the CPU decode kernel did not build" in capsys.readouterr().err
        assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-built left to load next time
    finally:
        cpu_decode.load.cache_clear()
