"""Fused residual-add + RMSNorm kernel vs the torch formula of HF's LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch

# Relative tolerance: two roundings in the output dtype (the normalised value, then its product with the
# weight) may each land one unit in the last place away when float32 statistics differ in their last bits.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


def reference(x, residual, weight, eps):
    r = x if residual is None else x + residual
    r32 = r.float()
    return weight * (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), r


def faithful_rounding(device, dtype) -> bool:
    """Whether float32 -> dtype rounds to nearest even here (the interpreter truncates to bfloat16)."""
    return dtype != torch.float32 and (device.type == "cuda" or dtype == torch.float16)


def check(device, num_tokens, hidden, dtype, with_residual, x_stride_extra=0):
    from hexgen.engine.kernels import add_rms_norm

    gen = torch.Generator().manual_seed(num_tokens * 1000 + hidden)
    x = (3 * torch.randn(num_tokens, hidden + x_stride_extra, generator=gen)).to(dtype).to(device)[:, :hidden]
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device) if with_residual else None
    weight = torch.empty(hidden).uniform_(0.5, 1.5, generator=gen).to(dtype).to(device)
    normed, new_residual = add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_residual = reference(x, residual, weight, 1e-5)
    assert normed.shape == x.shape and normed.dtype == dtype and new_residual.dtype == dtype
    if residual is None:
        assert new_residual is x
    elif dtype == torch.float32 or faithful_rounding(device, dtype):
        assert torch.equal(new_residual, expected_residual)
    else:
        torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=2**-7)
    rtol = RTOL[dtype]
    torch.testing.assert_close(normed.float().cpu(), expected_normed.float().cpu(), atol=rtol, rtol=rtol)
    if faithful_rounding(device, dtype):
        exact = (normed == expected_normed).float().mean().item()
        assert exact > 0.99, f"only {exact:.2%} of the outputs equal torch's bit for bit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "first-layer"])
def test_matches_torch(device, dtype, with_residual):
    check(device, 7, 576, dtype, with_residual)  # SmolLM2's width: not a power of two


@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (3, 4096)])
def test_shapes_and_strided_rows(device, num_tokens, hidden):
    check(device, num_tokens, hidden, torch.float32, True, x_stride_extra=8)


def test_no_tokens(device):
    from hexgen.engine.kernels import add_rms_norm

    x = torch.empty(0, 64, device=device)
    normed, new_residual = add_rms_norm(x, torch.empty_like(x), torch.ones(64, device=device), 1e-5)
    assert normed.shape == (0, 64) and new_residual.shape == (0, 64)
