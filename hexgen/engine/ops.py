"""The few fused operations of a decoder layer, each on the Triton kernel on CUDA (when triton is installed)
and on plain torch elsewhere; both paths compute the same thing, tested against each other."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from hexgen.engine.attention import LayerPool, StepMetadata, write_kv

# RoPE tables of a step: (cos, sin) [T, d / 2] for rotate-half pairs, or one complex [T, 1, d / 2] for interleaved
Rope = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


@functools.cache
def _triton_ready() -> bool:
    try:
        from hexgen.engine import kernels
    except ImportError:
        return False
    return kernels.available()


def triton_serves(device: torch.device) -> bool:
    """Whether the Triton kernels run this device's steps (CUDA with triton installed)."""
    return device.type == "cuda" and _triton_ready()


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_ready()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual), statistics in fp32; no residual: x alone."""
    if use_triton(x):
        from hexgen.engine import kernels

        return kernels.add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32:  # one fused CPU op; other dtypes keep HF's order of roundings below
        return F.rms_norm(x, weight.shape, weight, eps), x
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), x


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate):
        from hexgen.engine import kernels

        return kernels.silu_mul(gate, up)
    return F.silu(gate) * up


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, heads, head_dim] in place (rotate-half RoPE, no concatenation); cos, sin [T, head_dim / 2]."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:]
    rotated1 = x1 * cos - x2 * sin
    x2.mul_(cos).addcmul_(x1, sin)
    x1.copy_(rotated1)


def apply_rotary_interleaved_(x: torch.Tensor, rope: torch.Tensor) -> None:
    """Rotate x [T, heads, head_dim] in place, pairs (2i, 2i + 1) as complex numbers; rope [T, 1, head_dim / 2]
    complex (one row per token, broadcast over the heads)."""
    tokens, heads, head_dim = x.shape
    torch.view_as_complex(x.view(tokens, heads, head_dim // 2, 2)).mul_(rope)


def rotary_write_kv(
    qkv: torch.Tensor, heads: int, rope: Rope, pool: LayerPool, meta: StepMetadata,
) -> torch.Tensor:
    """qkv [T, heads + 2 kv_heads, d]: rotate its q and k heads in place, store the rotated k and the v in the
    pool, and return q [T, heads, d] (a view). rope: (cos, sin) [T, d / 2] for rotate-half pairs, or one complex
    table [T, 1, d / 2] for interleaved pairs (CPU, packed weights)."""
    kv_heads = (qkv.shape[1] - heads) // 2
    q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=1)
    if isinstance(rope, torch.Tensor):
        apply_rotary_interleaved_(qkv[:, : heads + kv_heads], rope)  # q and k rotated together, in place
    elif use_triton(qkv):
        from hexgen.engine import kernels

        kernels.rotary_write_kv(q, k, v, *rope, *pool.paged(), meta.slot_mapping)
        return q
    else:
        apply_rotary_(qkv[:, : heads + kv_heads], *rope)  # q and k rotated together, in place
    write_kv(pool, qkv[:, heads:], meta)  # k and v heads are adjacent, as a slot stores them
    return q
