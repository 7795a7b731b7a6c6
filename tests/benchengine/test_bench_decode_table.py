"""The decode-step table of `hexgen bench engine`: its floor by hand, and one tiny run end to end on CPU."""

from __future__ import annotations

import pytest
import torch

from hexgen.engine import cpu_attention
from hexgen.engine.bench import BenchConfig, bench_context
from hexgen.engine.bench_batch import check_batch_memory, kv_bytes_read, run_batched, weight_bytes_read
from hexgen.engine.bench_shapes import build_random_checkpoint
from hexgen.errors import UserError
from hexgen.models import load_model_spec
from hexgen.tokenizer import Tokenizer


def test_llama3_8b_bytes_read_per_decode_step():
    spec = load_model_spec("llama-3-8b")
    # per layer: q and o 4096 x 4096, k and v 4096 x 1024, gate/up/down 3 x 4096 x 14336, two norms of 4096
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    params = 32 * per_layer + 4096 + 128256 * 4096  # + final norm + LM head; the embedding is only gathered
    assert weight_bytes_read(spec, 2) == 2 * params == 15_009_849_344
    # 8 kv heads x 128 x (K and V) x 2 bytes x 32 layers per cached token
    assert kv_bytes_read(spec, 2, batch=4, context=100) == 4 * 100 * 32 * 2 * 8 * 128 * 2


def test_tiny_shape_runs_end_to_end(tmp_path):
    source = build_random_checkpoint("tiny", torch.float32, torch.device("cpu"), tmp_path)
    assert source.spec.num_layers == 4 and (tmp_path / "config.json").is_file()
    # its word-level tokenizer covers exactly the model's vocabulary, so `hexgen serve` can serve it
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.vocab_size == source.spec.vocab_size == 1024
    assert tokenizer.encode("w5 hello w1023") == [5, 0, 1023]
    assert tokenizer.decode([5, 7, 1023]) == "w5 w7 w1023"
    cfg = BenchConfig(prompt_tokens=8, new_tokens=2, repeats=1, dtype="float32")
    ticks = []
    result = run_batched(source, cfg, torch.device("cpu"), [1, 3], lambda: ticks.append(1))
    assert [row.batch for row in result.rows] == [1, 3] and len(ticks) == 4
    assert result.copy_gbps > 0 and result.weight_bytes_read == weight_bytes_read(source.spec, 4)
    for row in result.rows:
        assert row.hexgen_ms > 0 and row.floor_ms > 0 and row.hexgen_ops_per_layer > 0
    # CPU: no graphs, no Triton (the table's title says so); the attention kernel wherever a compiler built it
    kernel = " + CPU attention kernel" if cpu_attention.load() is not None else ""
    assert result.engine_mode == f"eager, torch ops{kernel}"
    for row in result.rows:  # where a step's time goes: the linear layers' oneDNN products are among the largest
        shares = [share.ms_per_step for share in row.profile.largest]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= row.profile.busy_ms + 1e-9
        by_name = {share.name: share for share in row.profile.largest}
        # 4 layers x (qkv, o, gate_up, down) + the LM head, in each step
        assert by_name["mkldnn::_linear_pointwise"].calls_per_step == 4 * 4 + 1


def test_an_engine_that_overlaps_its_steps_is_timed_both_ways(tmp_path):
    """Where the engine overlaps its steps (CUDA by default; forced here on CPU), the table also times them in
    series, and the engine is left overlapping; an engine in series is timed once."""
    from hexgen.engine.bench import HexgenSingle
    from hexgen.engine.bench_batch import engine_mode, hexgen_decode
    from hexgen.engine.scheduler import SchedulerConfig

    source = build_random_checkpoint("tiny", torch.float32, torch.device("cpu"), tmp_path)
    for overlap in (True, False):
        single = HexgenSingle(source, "float32", "cpu", SchedulerConfig(max_context=64, overlap_steps=overlap))
        step_s, serial_s, _ = hexgen_decode(single.engine, list(range(5, 13)), 3, 4, torch.device("cpu"))
        assert step_s > 0 and (serial_s is not None and serial_s > 0) == overlap
        assert single.engine.overlap == overlap and not single.engine.has_work
        assert engine_mode(single.engine).endswith(", steps overlapped") == overlap


def test_hexgen_triton_0_keeps_cuda_on_torch_ops(monkeypatch):
    """HEXGEN_TRITON=0 turns the kernels off on a machine where they would run (CUDA visible, triton importable):
    the fallback scripts/gpu_check.sh takes when a kernel fails on the GPU."""
    import importlib.util

    import pytest

    from hexgen.engine import kernels

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for setting, expected in (("1", True), ("0", False), (None, True)):
        if setting is None:
            monkeypatch.delenv("HEXGEN_TRITON", raising=False)
        else:
            monkeypatch.setenv("HEXGEN_TRITON", setting)
        kernels.available.cache_clear()
        assert kernels.available() is expected, setting
    kernels.available.cache_clear()


def test_decode_table_shows_steps_in_series_only_where_they_were_timed():
    from hexgen.engine.bench_batch import BatchedResult, StepProfile, StepTiming
    from hexgen.engine.bench_report import _batched_table, _markdown

    profile = StepProfile(ops=10.0, busy_ms=4.6, largest=())
    rows = [StepTiming(1, 4.80, 5.30, 19.9, 4.0, 11.4, profile), StepTiming(8, 5.00, 5.40, 20.1, 4.1, 11.4, profile)]
    overlapped = _markdown(_batched_table("bfloat16", BatchedResult("NVIDIA H200", 4183.0, 16 * 10**9, rows)))
    header, _, first, second = overlapped.strip().splitlines()[-4:]
    assert header.split("|")[-2].strip() == "hexgen ms/step, steps in series"
    assert [line.split("|")[-2].strip() for line in (first, second)] == ["5.30", "5.40"]
    assert first.split("|")[3].strip() == "208"  # tok/s from the overlapped step: 1000 / 4.80
    in_series = [StepTiming(1, 5.30, None, 19.9, 4.0, 11.4, profile)]
    table = _markdown(_batched_table("bfloat16", BatchedResult("CPU", 20.0, 10**9, in_series)))
    assert "steps in series" not in table


def test_batch_sizes_past_the_free_memory_are_refused_with_the_largest_that_fits():
    """A batch of 100,000 failed with the allocator's traceback after minutes of HF decoding; now refused before any
    model is built. By hand for llama-3-8b in bf16 at 1,000 tokens a sequence: weights 15,009,849,344 bytes; a
    sequence 1,000 x 131,072 bytes of KV (32 layers x 2 x 8 x 128 x 2) + 2 x 128,256 x 4 bytes of fp32 logits =
    132,098,048 bytes."""
    spec = load_model_spec("llama-3-8b")
    per_sequence = 1000 * 131_072 + 2 * 128_256 * 4
    free = 15_009_849_344 + 100 * per_sequence  # exactly 100 sequences
    check_batch_memory(spec, 2, [1, 100], 1000, free)
    with pytest.raises(UserError, match=r"--batch-sizes 101: decoding it needs at least .* no batch above 100 fits"):
        check_batch_memory(spec, 2, [1, 101], 1000, free)
    with pytest.raises(UserError, match="no batch above 0 fits"):
        check_batch_memory(spec, 2, [1], 1000, 1000)  # not even the weights


def test_the_bench_context_holds_the_run_within_the_model():
    """The engine's context was 4,096 whatever the run: --prompt-tokens 4000 or 100000 ended in a ValueError
    traceback. Now at least 4,096, more where the tokens need it (prompt + new + a 128-token margin), and a run past
    the model's own context (SmolLM2: 8,192) is refused."""
    spec = load_model_spec("smollm2-135m")
    assert bench_context(spec, BenchConfig(prompt_tokens=128, new_tokens=32)) == 4096
    assert bench_context(spec, BenchConfig(prompt_tokens=6000, new_tokens=32)) == 6160
    assert bench_context(spec, BenchConfig(prompt_tokens=8000, new_tokens=64)) == 8192
    with pytest.raises(UserError, match=r"do not fit smollm2-135m's context of 8192 tokens \(together at most 8064\)"):
        bench_context(spec, BenchConfig(prompt_tokens=8000, new_tokens=65))
