"""silu(gate) * up kernel vs torch's F.silu(gate) * up in the model dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# float32: triton's exp (exp2-based on CUDA) differs from torch's in the last bits; 16-bit: one rounding unit
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("num_tokens,width", [(3, 1536), (1, 100)])
def test_matches_torch(device, dtype, num_tokens, width):
    from hexgen.engine.kernels import silu_mul

    gen = torch.Generator().manual_seed(width)
    gate_up = (4 * torch.randn(num_tokens, 2 * width, generator=gen)).to(dtype).to(device)
    gate, up = gate_up[:, :width], gate_up[:, width:]  # views of a merged gate/up projection
    out = silu_mul(gate, up)
    expected = F.silu(gate) * up
    tol = RTOL[dtype] if dtype == torch.float32 or device.type == "cuda" else 2 * RTOL[dtype]  # interpreter truncates
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
