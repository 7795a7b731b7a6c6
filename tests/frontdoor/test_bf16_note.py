"""The note `hexgen generate` / `serve` print for --dtype bfloat16 on a CPU without bf16 matrix arithmetic."""

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
    values = dict(memory_gb=None, block_size=16, device="cpu", dtype="bfloat16", ray=None) | overrides
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
