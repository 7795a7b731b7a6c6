"""--dtype of `hexgen generate` / `serve`: what `auto` (the default) becomes, and the note printed for bfloat16 on a
CPU without bf16 matrix arithmetic."""

from __future__ import annotations

import argparse

import pytest

from hexgen import machine
from hexgen.commands import engine_args

AVX512_TRIO = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize(("flags", "lacks"), [
    ({"avx2", "fma"}, True),  # AVX2 only (this project's 2-core EPYC)
    ({"avx2", "avx512f"}, True),  # AVX-512 foundation alone does not make oneDNN's bf16 path
    (AVX512_TRIO, False),
    ({"avx2", "avx_ne_convert"}, False),
    ({"avx2", "amx_bf16"}, False),
    (set(), False),  # nothing known (not x86 Linux): no claim
])
def test_which_cpus_lack_bf16_matmul(monkeypatch, flags, lacks):
    monkeypatch.setattr(machine, "_cpu_model_and_flags", lambda: ("some CPU", flags))
    assert machine.cpu_lacks_bf16_matmul() is lacks


def args_of(**overrides) -> argparse.Namespace:
    values = dict(memory_gb=None, block_size=16, device="cpu", dtype="bfloat16", ray=None, speculative_tokens=0)
    values |= overrides
    return argparse.Namespace(**values)


@pytest.mark.parametrize(("overrides", "noted"), [
    ({}, True),
    ({"dtype": "float32"}, False),
    ({"device": "cuda"}, False),
    ({"ray": "127.0.0.1:6379"}, False),  # the ranks run on the cluster's machines, not this one
])
def test_note_only_for_bf16_on_this_cpu(monkeypatch, capsys, overrides, noted):
    monkeypatch.setattr(engine_args, "cpu_lacks_bf16_matmul", lambda: True)
    engine_args.check_engine_args(args_of(**overrides))
    err = capsys.readouterr().err
    assert ("--dtype float32 serves more" in err) is noted


def test_no_note_where_the_cpu_has_bf16_matmul(monkeypatch, capsys):
    monkeypatch.setattr(engine_args, "cpu_lacks_bf16_matmul", lambda: False)
    engine_args.check_engine_args(args_of())
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("flags", "has"), [
    ({"avx2", "fma"}, False),
    (AVX512_TRIO, False),  # oneDNN's bf16 path, but not native bf16 products: not measured faster than fp32
    (AVX512_TRIO | {"avx512_bf16"}, True),
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, True),
    (set(), False),
])
def test_which_cpus_have_bf16_arithmetic(monkeypatch, flags, has):
    monkeypatch.setattr(machine, "_cpu_model_and_flags", lambda: ("some CPU", flags))
    assert machine.cpu_has_bf16_arithmetic() is has


@pytest.mark.parametrize(("dtype", "device", "ray", "native_bf16", "resolved"), [
    ("auto", "cpu", None, True, "bfloat16"),
    ("auto", "cpu", None, False, "float32"),
    ("auto", "cpu", "127.0.0.1:6379", True, "float32"),  # the cluster's CPUs are not this one
    ("auto", "cuda", None, True, "bfloat16"),  # every visible GPU Ampere or later
    ("auto", "cuda", None, False, "float32"),  # e.g. a V100 or a T4 among them
    ("auto", "cuda", "127.0.0.1:6379", False, "bfloat16"),  # the cluster's GPUs are not seen from here
    ("float32", "cpu", None, True, "float32"),  # an explicit choice is kept
    ("float32", "cuda", None, True, "float32"),
    ("bfloat16", "cpu", None, False, "bfloat16"),
])
def test_auto_dtype(monkeypatch, capsys, dtype, device, ray, native_bf16, resolved):
    from hexgen.engine import devices

    monkeypatch.setattr(engine_args, "cpu_has_bf16_arithmetic", lambda: native_bf16)
    monkeypatch.setattr(engine_args, "cpu_lacks_bf16_matmul", lambda: not native_bf16)
    monkeypatch.setattr(devices, "cuda_bf16_everywhere", lambda: native_bf16)
    args = args_of(dtype=dtype, device=device, ray=ray)
    engine_args.check_engine_args(args)
    assert args.dtype == resolved
    noted = "--dtype float32 serves more" in capsys.readouterr().err
    assert noted is (dtype == "bfloat16" and device == "cpu" and not native_bf16)  # auto never earns the note


def test_generate_without_dtype_runs_what_this_cpu_does_best(tokenizer_model_dir):
    """End to end, the default: bfloat16 where /proc/cpuinfo lists bf16 arithmetic, else float32; said on stderr."""
    import subprocess
    import sys
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    flags = info.read_text().split() if info.exists() else []
    expected = "bfloat16" if "avx512_bf16" in flags or "amx_bf16" in flags else "float32"
    command = [sys.executable, "-m", "hexgen.cli", "generate", "--model", str(tokenizer_model_dir), "--prompt", "hi",
               "--max-new-tokens", "2", "--ignore-eos"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f" {expected} on " in done.stderr, done.stderr


def test_cuda_bf16_everywhere_reads_every_device(monkeypatch):
    import torch

    from hexgen.engine import devices

    capabilities = {0: (9, 0), 1: (7, 0)}  # an H100 beside a V100
    monkeypatch.setattr(devices, "cuda_device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    assert devices.cuda_bf16_everywhere() is False
    capabilities[1] = (8, 0)  # an A100
    assert devices.cuda_bf16_everywhere() is True
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    assert devices.cuda_bf16_everywhere() is True  # none: the device check after it says so
