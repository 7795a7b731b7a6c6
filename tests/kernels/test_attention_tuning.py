"""Choosing the paged-attention tiles by timing: the fastest candidate wins, later calls use it, a candidate the
card cannot fit is left out, and timing leaves the pool as it was."""

from __future__ import annotations

import pytest
import torch
from test_kernel_attention import reference

from hexgen.engine.kernels.attention import DECODE_TILES, PREFILL_TILES, Tiles

# Every candidate, whatever the device and dtype would get by default (fp32 on CUDA times FP32_TILES alone).
ALL_TILES = {"decode_tiles": DECODE_TILES, "prefill_tiles": PREFILL_TILES}


@pytest.fixture
def fresh_choices(monkeypatch):
    """Each test starts with nothing chosen and leaves nothing chosen behind."""
    from hexgen.engine.kernels import attention

    monkeypatch.setattr(attention, "_chosen", {})


def make_pool(num_blocks: int, device, block_size=16, kv_heads=2, head_dim=32):
    gen = torch.Generator().manual_seed(3)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device)


class ScriptedTimer:
    """Runs each candidate once, checks its output against the per-sequence reference, and answers the given
    times in call order (the decode candidates, then the prefill ones)."""

    def __init__(self, times, k_cache, v_cache):
        self.times = list(times)
        self.k_cache, self.v_cache = k_cache, v_cache
        self.calls = 0

    def __call__(self, run) -> float:
        step = run.__self__  # the SyntheticStep being timed
        expected = reference(step.q, self.k_cache, self.v_cache, step.block_tables, step.query_start,
                             step.context_lens, step.q.shape[2] ** -0.5)
        torch.testing.assert_close(run().float().cpu(), expected, atol=2e-5, rtol=2e-5)
        self.calls += 1
        return self.times.pop(0)


def test_the_fastest_candidates_are_chosen_and_used_by_later_calls(device, fresh_choices):
    from hexgen.engine.kernels import attention
    from hexgen.engine.kernels.attention_tuning import tune_attention

    k_cache, v_cache = make_pool(40, device)
    before = k_cache.clone(), v_cache.clone()
    timer = ScriptedTimer([3.0, 1.0, 2.0, 5.0, 6.0, 4.0], k_cache, v_cache)
    result = tune_attention(k_cache, v_cache, num_q_heads=6, timer=timer, **ALL_TILES)
    assert timer.calls == len(DECODE_TILES) + len(PREFILL_TILES) == 6
    assert result.decode_choice == DECODE_TILES[1] and result.prefill_choice == PREFILL_TILES[2]
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])  # timing wrote nothing

    q = torch.zeros(5, 6, 32, device=device)
    assert attention.tiles_for(q, k_cache, decode=True) == DECODE_TILES[1]
    assert attention.tiles_for(q, k_cache, decode=False) == PREFILL_TILES[2]
    # another shape (8 query heads) or block size keeps the defaults (on CUDA in fp32: FP32_TILES)
    defaults = [attention.candidate_tiles(k_cache.dtype, device, decode)[0] for decode in (True, False)]
    assert attention.tiles_for(torch.zeros(5, 8, 32, device=device), k_cache, decode=True) == defaults[0]
    assert attention.tiles_for(q, k_cache.view(80, 8, 2, 32), decode=False) == defaults[1]
    assert "decode 16 rows x 128 keys" in result.summary() and "prefill 64 rows x 64 keys, 4 warps, 2 stages" in (
        result.summary())


def test_a_small_pool_shrinks_the_synthetic_steps(device, fresh_choices):
    """Three blocks cannot hold 32 sequences of 1,024 keys: the steps use the blocks there are, within bounds."""
    from hexgen.engine.kernels.attention_tuning import tune_attention

    k_cache, v_cache = make_pool(3, device)
    timer = ScriptedTimer([1.0] * 6, k_cache, v_cache)
    tune_attention(k_cache, v_cache, num_q_heads=4, timer=timer, **ALL_TILES)
    assert timer.calls == 6


def failure(kind: str) -> Exception:
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    if kind == "shared memory":
        return OutOfResources(232448, 101376, "shared memory")
    if kind == "ptxas":
        return PTXASError("ptxas fatal: registers exceed the limit\nmore detail")
    return CompileTimeAssertionFailure("def kernel(): ...", None, "static_assert failed: block too large")


@pytest.mark.parametrize("kind,why", [
    ("shared memory", "out of resource: shared memory, Required: 232448, Hardware limit: 101376"),
    ("ptxas", "PTXAS error: ptxas fatal: registers exceed the limit"),
    ("assertion", "static_assert failed: block too large"),
])
def test_candidates_that_do_not_fit_the_card_are_left_out(device, fresh_choices, kind, why):
    """Too much shared memory at launch, ptxas refusing the binary, a compile-time assertion: the card cannot run
    these tiles, so they are left out rather than failing the rank's start."""
    from hexgen.engine.kernels.attention_tuning import tune_attention

    k_cache, v_cache = make_pool(8, device)
    answers = iter([failure(kind), 2.0, 1.5, 1.0, 9.0, 9.0])

    def timer(run) -> float:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    result = tune_attention(k_cache, v_cache, num_q_heads=2, timer=timer, **ALL_TILES)
    assert result.decode[0].ms is None and result.decode[0].error.startswith(why)  # its first line, no source
    assert "\n" not in result.decode[0].error and "def kernel" not in result.decode[0].error
    assert result.decode_choice == DECODE_TILES[2] and result.prefill_choice == PREFILL_TILES[0]
    assert "did not fit" in result.summary()


def test_no_candidate_fitting_is_an_error_naming_them(device, fresh_choices):
    from triton.runtime.errors import OutOfResources

    from hexgen.engine.kernels.attention_tuning import tune_attention

    k_cache, v_cache = make_pool(8, device)

    def timer(run) -> float:
        raise OutOfResources(300000, 101376, "shared memory")

    with pytest.raises(RuntimeError, match="no candidate tiles .* 16 rows x 64 keys, 4 warps, 3 stages: out of"):
        tune_attention(k_cache, v_cache, num_q_heads=2, timer=timer, prefill_tiles=[Tiles(64, 64)])


def test_fp32_on_cuda_times_only_the_tiles_that_fit_in_registers():
    """fp32 products on CUDA spill registers at the larger tiles (tests/kernels/compile_for_gpu.py): the tuner never
    offers them there; 16-bit dtypes and the interpreter get every candidate."""
    from hexgen.engine.kernels.attention import FP32_TILES, candidate_tiles

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert candidate_tiles(torch.float32, cuda, decode=False) == candidate_tiles(torch.float32, cuda, True) == (
        FP32_TILES,)
    assert candidate_tiles(torch.bfloat16, cuda, decode=False) == PREFILL_TILES
    assert candidate_tiles(torch.float32, cpu, decode=True) == DECODE_TILES
