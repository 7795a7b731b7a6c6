"""The CPU attention kernel (engine/csrc/paged_attention.c) against the gather path it replaces, on the embedded
SmolLM2-135M's shapes: one layer's attention alone, then whole-model steps of one process.

    .venv/bin/python scripts/bench_cpu_attention.py [--dtype bfloat16] [--reps 10] [--steps-only | --layers-only]
        [--avx2]

Each case builds one step's plan (sequences on shuffled blocks of the default CPU block size, their cached keys
random) and times the step with the kernel and with the gather path (SDPA, or batched matmuls for decodes),
alternating the two so the shared machine's load falls on both alike; medians in ms. The whole-model steps run
`StageRunner.forward` (embedding, 30 layers, final norm) with `runner.attention_kernel` set and then unset.
`--avx2` times the kernel built without AVX-512 (-mno-avx512f: 8-float vectors, as on an AVX2-only CPU) instead of
the native build.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import subprocess
import time
from functools import partial

import torch

from hexgen.engine import cpu_attention
from hexgen.engine.attention import LayerPool, build_metadata, paged_attention
from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.engine import build_runner, init_rank
from hexgen.engine.messages import StepPlan
from hexgen.engine.scheduler import SchedulerConfig, default_block_size
from hexgen.launch.spec import Layout, RankSpec

# (what, tokens each sequence brings, keys cached before them); SmolLM2's 9 query and 3 KV heads of 64
CASES = [
    ("1 fresh prompt of 1,000 tokens", [1000], [0]),
    ("4 fresh prompts of 32", [32] * 4, [0] * 4),
    ("4 fresh prompts of 256", [256] * 4, [0] * 4),
    ("a 256-token chunk after 768 cached", [256], [768]),
    ("15 decodes over 1,040 + a 128-token chunk", [1] * 15 + [128], [1039] * 15 + [0]),
    ("15 decodes over 100 + a 32-token prompt", [1] * 15 + [32], [99] * 15 + [0]),
    ("16 decodes over 1,040", [1] * 16, [1039] * 16),
    ("16 decodes over 100", [1] * 16, [99] * 16),
    ("16 decodes with 4 drafts over 1,040", [5] * 16, [1035] * 16),
]
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def plan_for(lengths: list[int], starts: list[int], block_size: int, seed: int = 0) -> tuple[StepPlan, int]:
    """A plan whose sequences own shuffled, disjoint blocks covering start + length tokens; and the blocks used."""
    counts = [-(-(s + n) // block_size) for s, n in zip(starts, lengths, strict=True)]
    free = list(range(sum(counts)))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(c)] for c in counts]
    return StepPlan(seq_ids=list(range(len(lengths))), starts=starts, lengths=lengths, token_ids=[0] * sum(lengths),
                    block_tables=tables, sample=[True] * len(lengths)), sum(counts)


def alternate(a, b, reps: int) -> tuple[float, float]:
    """Median ms of a() and b(), called in turn (after one warm-up each)."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[0]), statistics.median(times[1])


def layer_table(build: cpu_attention.AttentionKernel, dtype: torch.dtype, reps: int) -> list[str]:
    kernel = dataclasses.replace(build, group=HEADS // KV_HEADS)
    block_size = default_block_size("cpu", HEAD_DIM, dtype.itemsize)
    rows = ["| step | gather path (ms) | kernel (ms) | speed-up |", "|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for what, lengths, starts in CASES:
        plan, blocks = plan_for(lengths, starts, block_size)
        pool = LayerPool.of(torch.randn(blocks, 2 * KV_HEADS * block_size * HEAD_DIM, generator=gen).to(dtype),
                            block_size, KV_HEADS, HEAD_DIM, head_major=True)
        q = torch.randn(sum(lengths), HEADS, HEAD_DIM, generator=gen).to(dtype)
        cpu = torch.device("cpu")
        with_kernel = build_metadata(plan, block_size, cpu, False, KV_HEADS, dtype, kernel)
        gathered = build_metadata(plan, block_size, cpu, False, KV_HEADS, dtype, None)
        def attend(meta, q: torch.Tensor = q, pool: LayerPool = pool) -> torch.Tensor:
            return paged_attention(q, pool, meta, HEAD_DIM**-0.5)

        gather_ms, kernel_ms = alternate(partial(attend, gathered), partial(attend, with_kernel), reps)
        rows.append(f"| {what} | {gather_ms:.2f} | {kernel_ms:.2f} | {gather_ms / kernel_ms:.2f}x |")
    return rows


def step_table(build: cpu_attention.AttentionKernel, dtype: torch.dtype, reps: int) -> list[str]:
    source = resolve_model("smollm2-135m", progress=False)
    spec = RankSpec(source, Layout((1,), ((0, source.spec.num_layers),)), 0, dtype=str(dtype).split(".")[1])
    block_size = default_block_size("cpu", source.spec.head_dim, dtype.itemsize)
    runner = build_runner(spec, init_rank(spec), SchedulerConfig(max_running_seqs=16, num_kv_blocks=1200,
                                                                 block_size=block_size, max_context=2048))
    assert runner.attention_kernel is not None, "the runner took no CPU attention kernel"
    kernel = dataclasses.replace(build, group=runner.attention_kernel.group)
    rows = ["| step (whole model) | gather path (ms) | kernel (ms) | speed-up |", "|---|---|---|---|"]
    for what, lengths, starts in CASES:
        plan, _ = plan_for(lengths, starts, block_size)

        def step(use: cpu_attention.AttentionKernel | None, plan: StepPlan = plan) -> None:
            runner.attention_kernel = use
            runner.forward(plan, None)

        gather_ms, kernel_ms = alternate(lambda: step(None), lambda: step(kernel), reps)
        rows.append(f"| {what} | {gather_ms:.1f} | {kernel_ms:.1f} | {gather_ms / kernel_ms:.2f}x |")
    runner.attention_kernel = kernel
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=10, help="timed calls of each path per case (default 10)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--layers-only", action="store_true")
    which.add_argument("--steps-only", action="store_true")
    parser.add_argument("--avx2", action="store_true", help="time the kernel built without AVX-512 (-mno-avx512f)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    dtype = getattr(torch, args.dtype)
    kernel = cpu_attention.load(("-mno-avx512f",) if args.avx2 else ())
    if kernel is None:
        raise SystemExit("bench_cpu_attention: no CPU attention kernel here (no C compiler?)")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {model}, {torch.get_num_threads()} threads, "
          f"{args.dtype}; kernel{' built without AVX-512' if args.avx2 else ''}: {dataclasses.asdict(kernel.limits)}")
    with torch.inference_mode():
        if not args.steps_only:
            print("\n".join(["", "One layer's attention:", *layer_table(kernel, dtype, args.reps)]))
        if not args.layers_only:
            print("\n".join(["", "Whole-model steps:", *step_table(kernel, dtype, args.reps)]))


if __name__ == "__main__":
    main()
