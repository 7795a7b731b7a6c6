"""SwiGLU's silu(gate) * up in one launch (Triton), rounded in the model dtype as torch's two ops round it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hexgen.engine.kernels._common import check_dtype

BLOCK = 1024  # columns per program


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < width
    gate = tl.load(gate_ptr + row * stride_g + cols, mask=valid, other=0.0)
    up = tl.load(up_ptr + row * stride_u + cols, mask=valid, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded like F.silu's output
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(gate.dtype), mask=valid)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [T, I] (views of one merged projection are fine); returns [T, I]."""
    check_dtype("gate", gate)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError("the last dimension of gate and up must be contiguous")
    num_tokens, width = gate.shape
    out = torch.empty((num_tokens, width), dtype=gate.dtype, device=gate.device)
    if num_tokens == 0:
        return out
    grid = (num_tokens, triton.cdiv(width, BLOCK))
    _silu_mul_kernel[grid](gate, up, out, gate.stride(0), up.stride(0), out.stride(0), width, BLOCK=BLOCK)
    return out
