"""Choose the paged-attention kernel's tiles for this GPU by timing the candidates on the engine's own shape.

GPUs differ in shared memory, registers and bandwidth, and the fastest way to cut attention into programs
differs with them (a pool of mixed cards is what hexgen serves). So a CUDA rank, once its KV pool exists and
before it captures its decode graphs, times each of attention.DECODE_TILES on a synthetic decode step and each
of attention.PREFILL_TILES on a synthetic prompt (fp32 on CUDA: only FP32_TILES, the others spill registers),
reading its own pool through made-up block tables (the pool is zeroed, nothing is written), and launches every
later call of that shape with the fastest (attention.choose_tiles). A candidate the card cannot run (too much
shared memory, ptxas refusing the binary, a compile-time assertion) is left out there. Costs the candidates'
compilation once per machine (Triton caches the binaries on disk) and ~25 ms of timing each.

Tiles change the order in which a row's keys are summed, so two runs that chose differently can differ in the
last bits of bf16 attention outputs; a run's own steps all use one choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hexgen.engine.kernels import attention
from hexgen.engine.kernels.attention import Tiles

DECODE_SEQS, DECODE_CONTEXT = 32, 1024  # the synthetic decode step: 32 sequences over 1,024 keys each
PREFILL_TOKENS = 1024  # the synthetic prompt, attended whole

Timer = Callable[[Callable[[], object]], float]  # milliseconds per call of the function


@dataclass(frozen=True)
class TileTiming:
    tiles: Tiles
    ms: float | None  # None: the card could not run these tiles (why in `error`)
    error: str = ""


@dataclass(frozen=True)
class TuningResult:
    decode: list[TileTiming]
    prefill: list[TileTiming]

    @property
    def decode_choice(self) -> Tiles:
        return fastest(self.decode)

    @property
    def prefill_choice(self) -> Tiles:
        return fastest(self.prefill)

    def summary(self) -> str:
        def kind(name: str, timings: list[TileTiming]) -> str:
            times = ", ".join(f"{t.tiles.rows}x{t.tiles.block_n}/w{t.tiles.num_warps}/s{t.tiles.num_stages} "
                              + (f"{1000 * t.ms:.0f} µs" if t.ms is not None else "did not fit")
                              for t in timings)
            return f"{name} {fastest(timings)} ({times})"

        return f"attention tiles: {kind('decode', self.decode)}; {kind('prefill', self.prefill)}"


def fastest(timings: list[TileTiming]) -> Tiles:
    ran = [t for t in timings if t.ms is not None]
    if not ran:
        raise RuntimeError("no candidate tiles of the paged-attention kernel run on this GPU: "
                           + "; ".join(f"{t.tiles}: {t.error}" for t in timings))
    return min(ran, key=lambda t: t.ms).tiles


def cuda_timer(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def tune_attention(k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int, timer: Timer | None = None,
                   decode_tiles: Sequence[Tiles] | None = None,
                   prefill_tiles: Sequence[Tiles] | None = None) -> TuningResult:
    """Time the candidate tiles (by default attention.candidate_tiles for the pool's dtype and device) over one
    layer's pool, k_cache and v_cache [blocks, block_size, kv_heads, d], and choose the fastest of each kind for
    this device and shape. The synthetic steps shrink to what the pool holds."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    timer = timer or cuda_timer
    device, dtype = k_cache.device, k_cache.dtype
    decode_tiles = decode_tiles or attention.candidate_tiles(dtype, device, decode=True)
    prefill_tiles = prefill_tiles or attention.candidate_tiles(dtype, device, decode=False)
    blocks_per_seq = max(1, min(DECODE_CONTEXT // block_size, num_blocks // DECODE_SEQS))
    decode_seqs = max(1, min(DECODE_SEQS, num_blocks // blocks_per_seq))
    prefill = block_size * max(1, min(PREFILL_TOKENS // block_size, num_blocks))
    result = TuningResult(
        decode=[_time(timer, k_cache, v_cache, num_q_heads, [1] * decode_seqs, blocks_per_seq * block_size, tiles)
                for tiles in decode_tiles],
        prefill=[_time(timer, k_cache, v_cache, num_q_heads, [prefill], prefill, tiles) for tiles in prefill_tiles],
    )
    for decode, choice in ((True, result.decode_choice), (False, result.prefill_choice)):
        key = attention.tiles_key(device, dtype, num_q_heads, num_kv_heads, head_dim, block_size, decode)
        attention.choose_tiles(key, choice)
    return result


@dataclass(frozen=True)
class SyntheticStep:
    """A step of sequences that each bring new_tokens[b] queries and see `context` keys (a whole number of
    blocks), their blocks the pool's first ones in turn; `run` attends it with the given tiles."""

    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    max_query_len: int
    tiles: Tiles

    @staticmethod
    def of(k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int, new_tokens: list[int], context: int,
           tiles: Tiles) -> SyntheticStep:
        device, head_dim, block_size = k_cache.device, k_cache.shape[3], k_cache.shape[1]
        tables = torch.arange(len(new_tokens) * (context // block_size), dtype=torch.int32, device=device)
        query_start = torch.tensor([0, *new_tokens], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(sum(new_tokens), num_q_heads, head_dim, generator=gen, device=device).to(k_cache.dtype)
        return SyntheticStep(q, k_cache, v_cache, tables.view(len(new_tokens), -1), query_start,
                             torch.full((len(new_tokens),), context, dtype=torch.int32, device=device),
                             max(new_tokens), tiles)

    def run(self) -> torch.Tensor:
        return attention.paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start,
                                         self.context_lens, self.max_query_len, self.q.shape[2] ** -0.5,
                                         tiles=self.tiles)


def _time(timer: Timer, k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int, new_tokens: list[int],
          context: int, tiles: Tiles) -> TileTiming:
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    step = SyntheticStep.of(k_cache, v_cache, num_q_heads, new_tokens, context, tiles)
    try:
        return TileTiming(tiles, timer(step.run))
    except (OutOfResources, PTXASError, CompileTimeAssertionFailure) as exc:  # what this card cannot build or run
        # a compilation error's text starts with the kernel's source: its own message says why
        why = exc.error_message if isinstance(exc, CompileTimeAssertionFailure) else str(exc)
        return TileTiming(tiles, None, ((why or "").strip() or type(exc).__name__).splitlines()[0])
