"""The KV block size when the user names none: 16 tokens on CUDA; on CPU the smallest power of two from 16 whose
block holds 4 KiB of one KV head (the gather path copies a block's head as one row). Through the CLI:
tests/frontdoor/test_cli_help.py::test_the_block_size_default_follows_the_dtype_on_cpu."""

from __future__ import annotations

import pytest

from hexgen.engine.scheduler import default_block_size


@pytest.mark.parametrize(("device", "head_dim", "dtype_bytes", "expected"), [
    ("cuda", 64, 2, 16),  # the Triton kernels' blocks: unchanged
    ("cuda", 32, 4, 16),
    ("cpu", 64, 4, 16),  # 16 x 64 x 4 = 4 KiB already
    ("cpu", 64, 2, 32),  # 16 x 64 x 2 = 2 KiB: doubled once
    ("cpu", 128, 2, 16),  # Llama's head size in bf16: 4 KiB at 16
    ("cpu", 32, 2, 64),  # 64 x 32 x 2 = 4 KiB
    ("cpu", 1, 2, 256),  # never past the largest valid size
])
def test_default_block_size_by_hand(device, head_dim, dtype_bytes, expected):
    assert default_block_size(device, head_dim, dtype_bytes) == expected
