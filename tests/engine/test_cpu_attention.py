"""The CPU attention kernel (hexgen/engine/cpu_attention.py) against brute force in float64, token by token, in each
of its builds (AVX-512 with and without AVX512_BF16, and AVX2 where the CPU has them), and its fall-backs: switched
off, or no compiler that builds it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hexgen.engine import cpu_attention

CPU_FLAGS = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
# each build the tests run: gcc's -march=native, then that without AVX512_BF16, then without AVX-512 at all
BUILDS = {"native": (), "no-avx512bf16": ("-mno-avx512bf16",), "avx2": ("-mno-avx512f",)}


@pytest.fixture(scope="module", params=list(BUILDS))
def kernel(request):
    if request.param != "native" and "avx512f" not in CPU_FLAGS:
        pytest.skip("the CPU has no AVX-512: the native build is the only one")
    if request.param == "no-avx512bf16" and "avx512_bf16" not in CPU_FLAGS:
        pytest.skip("the CPU has no AVX512_BF16: the native build is this one")
    built = cpu_attention.load(BUILDS[request.param])
    if built is None:
        pytest.skip("no C compiler built the CPU attention kernel here")
    return built


def random_case(seed: int, contexts: list[int], new: list[int], kv_heads: int, group: int, head_dim: int,
                block_size: int, dtype: torch.dtype):
    """A head-major pool [blocks, 2 kv_heads * block_size * d] with shuffled disjoint blocks per sequence, the
    queries of each sequence's last new[b] tokens [sum(new), h, d], the padded int64 tables."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    counts = [-(-c // block_size) for c in contexts]
    free = list(range(sum(counts) + 3))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in counts]
    pool = torch.randn(len(free) + sum(counts), 2 * kv_heads * block_size * head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(new), kv_heads * group, head_dim, generator=gen).to(dtype)
    padded = torch.tensor([t + [0] * (max(counts) - len(t)) for t in tables], dtype=torch.int64)
    return pool, q, tables, padded


def brute_force(pool, q, table, keys_seen, kv_heads, block_size, scale):
    """One query token alone, in float64: its sequence's blocks' keys and values laid end to end, cut at the keys it
    sees, then the softmax of each query head against its KV head (heads h*g .. h*g+g-1 share KV head h)."""
    head_dim = q.shape[-1]
    blocks = pool.double().view(pool.shape[0], 2, kv_heads, block_size, head_dim)
    keys = torch.cat([blocks[t, 0] for t in table], dim=1)[:, :keys_seen]  # [kv_heads, keys_seen, d]
    values = torch.cat([blocks[t, 1] for t in table], dim=1)[:, :keys_seen]
    query = q.double().view(kv_heads, -1, head_dim)  # [kv_heads, g, d]
    weights = torch.softmax(query @ keys.transpose(1, 2) * scale, dim=-1)
    return (weights @ values).reshape(-1, head_dim)


def check(kernel, contexts, new, kv_heads, group, head_dim, block_size, dtype, tile_tokens, seed=0, q_scale=1.0):
    """The kernel's output for every new token of every sequence against brute force over that token's prefix
    (queries times q_scale: scores spread that much wider)."""
    pool, q, tables, padded = random_case(seed + head_dim + len(contexts), contexts, new, kv_heads, group, head_dim,
                                          block_size, dtype)
    q = (q.float() * q_scale).to(dtype)
    scale = head_dim**-0.5
    assert kernel.supports(dtype, group, head_dim, block_size)
    positions = [c - n for c, n in zip(contexts, new, strict=True)]
    tasks = cpu_attention.split_tasks(new, positions, tile_tokens)
    ours = kernel(q, pool, padded, tasks, kv_heads, block_size, scale)
    assert ours.dtype == dtype and ours.shape == q.shape
    # fp32: the sums' order only; bf16: inputs as stored, fp32 sums, the output rounded once (2^-8 relative), and
    # with AVX512_BF16 in tiles the probabilities rounded to bf16 too. A score's rounding in fp32 grows with its size
    # (q_scale), and each probability's error with it
    tolerance = 1e-5 * q_scale if dtype == torch.float32 else 1.6e-2
    row = 0
    for b, (context, n) in enumerate(zip(contexts, new, strict=True)):
        for i in range(n):
            expected = brute_force(pool, q[row], tables[b], context - n + i + 1, kv_heads, block_size, scale)
            torch.testing.assert_close(ours[row].double(), expected, rtol=tolerance, atol=tolerance)
            row += 1


@pytest.mark.parametrize(("contexts", "kv_heads", "group", "head_dim", "block_size"), [
    ([1, 16, 17, 32, 33, 5], 2, 3, 8, 16),  # one key; a block filled exactly; the key that opens the next block
    ([300, 1, 129], 3, 3, 64, 32),  # SmolLM2's heads: long and short in one step
    ([64, 65], 1, 16, 32, 1),  # blocks of one token; the largest query group (rows not unrolled)
    ([200], 4, 1, 128, 256),  # no grouping; one block of the largest size
    ([90, 3], 2, 8, 24, 16),  # the largest group whose rows are unrolled; 16 + 8 dims
    ([40], 1, 9, 8, 16),  # the smallest group whose rows are not
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodes_match_brute_force(kernel, contexts, kv_heads, group, head_dim, block_size, dtype):
    check(kernel, contexts, [1] * len(contexts), kv_heads, group, head_dim, block_size, dtype, tile_tokens=1)


@pytest.mark.parametrize(("contexts", "new", "kv_heads", "group", "head_dim", "block_size"), [
    ([70, 40, 5], [70, 7, 1], 3, 3, 64, 16),  # a fresh prompt, a chunk after cached keys, a decode; SmolLM2 heads
    ([33, 32, 65], [33, 32, 2], 2, 4, 16, 8),  # spans of 32 keys: one past, exactly, a decode with a draft
    ([100], [100], 1, 16, 8, 32),  # the largest group (4 tokens a tile), 8 dims (the vectors' tail only)
    ([129, 50], [64, 50], 2, 1, 24, 1),  # no grouping (64 tokens a tile), blocks of one token, 16 + 8 dims
    ([300], [37], 1, 2, 128, 256),  # one block of the largest size, a chunk after 263 cached keys
    ([45], [45], 1, 5, 256, 16),  # the largest head; 5 query heads per KV head: 60 rows, padded to 64
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_match_brute_force(kernel, contexts, new, kv_heads, group, head_dim, block_size, dtype):
    """Several tokens of a sequence attended together (a tile: chunks of prompts, a decode with drafts): token i
    sees its sequence's keys up to its own."""
    check(kernel, contexts, new, kv_heads, group, head_dim, block_size, dtype,
          tile_tokens=max(1, kernel.limits.tile_rows // group))


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_scores_match_brute_force(kernel, tiles, dtype):
    """Scores a row spreads over hundreds (queries 40x: a standard deviation of about 40), as an attention sink
    does: most exponents fall below exp's range, where the kernel holds them at exp(-80), and the answer is still
    the brute force one."""
    check(kernel, [300, 70, 33], [1, 40, 33] if tiles else [1, 1, 1], 3, 3, 64, 32, dtype,
          tile_tokens=kernel.limits.tile_rows // 3 if tiles else 1, q_scale=40.0)


def test_each_build_multiplies_as_its_cpu_allows(kernel, request):
    """The native build takes bf16 products two at a time where the CPU has AVX512_BF16 and 16-float vectors
    where it has AVX-512; -mno-avx512bf16 and -mno-avx512f take them away."""
    build = request.node.callspec.params["kernel"]
    if build == "native":
        assert kernel.limits.bf16_dot_products == ("avx512_bf16" in CPU_FLAGS)
        assert kernel.limits.vector_width == (16 if "avx512f" in CPU_FLAGS else 8)
    elif build == "avx2":
        assert not kernel.limits.bf16_dot_products and kernel.limits.vector_width == 8
    else:
        assert not kernel.limits.bf16_dot_products and kernel.limits.vector_width == 16


def test_tasks_are_tiles_of_each_sequence_costliest_first():
    tasks = cpu_attention.split_tasks([5, 1, 3], [0, 9, 2], tile_tokens=2)
    # (first row, tokens, sequence, first position) by hand: sequence 0's rows 0-4 from position 0 in tiles of
    # 2, 2, 1; sequence 1's decode at row 5, position 9; sequence 2's rows 6-8 from position 2 in tiles of 2, 1;
    # sorted by tokens x keys its last token sees: 1x10, 2x4, 2x4, 1x5, 1x5, 2x2 (ties in order)
    assert tasks.tolist() == [[5, 1, 1, 9], [2, 2, 0, 2], [6, 2, 2, 2], [4, 1, 0, 4], [8, 1, 2, 4], [0, 2, 0, 0]]
    assert cpu_attention.split_tasks([3], [4], tile_tokens=1).tolist() == [[2, 1, 0, 6], [1, 1, 0, 5], [0, 1, 0, 4]]


def test_the_output_does_not_depend_on_the_thread_count():
    """Each (task, KV head) pair is summed by one thread in one order: bit-identical on 1 or 2 threads."""
    kernel = cpu_attention.load()
    if kernel is None:
        pytest.skip("no C compiler built the CPU attention kernel here")
    contexts, new = [700, 33, 1, 260], [100, 1, 1, 60]
    pool, q, _, padded = random_case(3, contexts, new, 3, 3, 64, 32, torch.bfloat16)
    tasks = cpu_attention.split_tasks(new, [c - n for c, n in zip(contexts, new, strict=True)], 21)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernel(q, pool, padded, tasks, 3, 32, 0.125)
        torch.set_num_threads(2)
        shared = kernel(q, pool, padded, tasks, 3, 32, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)


def test_a_profile_shows_each_call_as_one_op():
    """`hexgen bench engine` counts a CPU step's top-level ops and their time under torch.profiler."""
    kernel = cpu_attention.load()
    if kernel is None:
        pytest.skip("no C compiler built the CPU attention kernel here")
    pool, q, _, padded = random_case(5, [40, 9], [1, 1], 2, 2, 8, 16, torch.float32)
    tasks = cpu_attention.split_tasks([1, 1], [39, 8], 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        kernel(q, pool, padded, tasks, 2, 16, 0.3)
        kernel(q, pool, padded, tasks, 2, 16, 0.3)
    calls = [e for e in prof.events() if e.name == cpu_attention.PROFILE_NAME]
    assert len(calls) == 2 and all(e.cpu_parent is None for e in calls)


def test_shapes_past_the_limits_take_the_gather_path():
    kernel = cpu_attention.load()
    if kernel is None:
        pytest.skip("no C compiler built the CPU attention kernel here")
    cpu = torch.device("cpu")
    bound = cpu_attention.attention_kernel_for(cpu, torch.float32, 9, 3, 64, 32)
    assert bound is not None and bound.library is kernel.library and bound.group == 3
    assert bound.tile_tokens == 21  # a tile holds 64 query rows: 21 tokens of 3 query heads each
    assert cpu_attention.attention_kernel_for(cpu, torch.float16, 9, 3, 64, 32) is None  # fp16: not built for
    assert cpu_attention.attention_kernel_for(cpu, torch.float32, 34, 2, 64, 32) is None  # group of 17
    assert cpu_attention.attention_kernel_for(cpu, torch.float32, 9, 3, 512, 32) is None
    assert cpu_attention.attention_kernel_for(cpu, torch.float32, 9, 3, 60, 32) is None  # not a multiple of 8
    assert cpu_attention.attention_kernel_for(cpu, torch.float32, 9, 3, 64, 512) is None
    assert cpu_attention.attention_kernel_for(torch.device("meta"), torch.float32, 9, 3, 64, 32) is None


def test_switched_off_or_unbuildable_it_is_not_used(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(cpu_attention.DISABLE_ENV, "0")
    cpu_attention.load.cache_clear()
    try:
        assert cpu_attention.load() is None
        monkeypatch.delenv(cpu_attention.DISABLE_ENV)
        monkeypatch.setenv("HEXGEN_CACHE_DIR", str(tmp_path))  # nothing cached: it must build
        monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
        cpu_attention.load.cache_clear()
        assert cpu_attention.load() is None
        assert "the CPU attention kernel did not build" in capsys.readouterr().err
        assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-built left to load next time
    finally:
        cpu_attention.load.cache_clear()


def test_every_build_serves_the_engine_token_for_token_with_hf(kernel, tiny_model_dirs, monkeypatch):
    """The engine on the kernel of each build (the AVX2 one too: it takes whole steps, chunks in tiles) gives HF
    transformers' greedy tokens: prompts prefilled in chunks beside decodes, and decodes with n-gram drafts (tiles of
    a few tokens)."""
    from engine_helpers import greedy_requests, hf_greedy, load_hf, random_prompts, run_in_process

    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.scheduler import SchedulerConfig

    engines: list = []
    monkeypatch.setattr(cpu_attention, "load", lambda extra_flags=(): kernel)  # what every rank's runner takes
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    phrase = random_prompts(source.spec.vocab_size, [4], seed=3)[0]
    prompts = [*random_prompts(source.spec.vocab_size, [70, 5, 33], seed=11), phrase * 6]  # the last one repeats
    # 24 tokens a step: the 70- and 33-token prompts go in chunks, later ones beside the first prompts' decodes
    config = SchedulerConfig(max_context=source.spec.max_context, max_step_tokens=24, speculative_tokens=3)
    tokens, _ = run_in_process(source, greedy_requests(prompts, 12), config, engines=engines)
    assert engines[0].runner.attention_kernel.library is kernel.library
    model = load_hf(tiny_model_dirs["gqa"])
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(model, prompt, 12)[0]
