"""Time each Triton kernel beside the torch ops it replaces and beside its memory floor (Llama-3-8B shapes).

    python scripts/kernel_bench.py [--tiny] [--markdown FILE]

On CUDA the times are triton.testing.do_bench medians, and the host column is the CPU time to issue one call
(the cost per launch a step pays outside a CUDA graph). Without a GPU the kernels run in Triton's
interpreter on small shapes (--tiny is implied): that checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

from hexgen.engine import kernels  # noqa: E402
from hexgen.engine.bench_batch import copy_gbps  # noqa: E402
from hexgen.engine.kernels.attention import DECODE_TILES, PREFILL_TILES, choose_kv_splits  # noqa: E402
from hexgen.engine.kernels.attention_tuning import tune_attention  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16
HQ, HKV, D, HIDDEN, INTERMEDIATE, BLOCK = 32, 8, 128, 4096, 14336, 16  # Llama-3-8B


def time_ms(fn) -> float:
    if ON_GPU:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def host_us(fn, calls: int = 200) -> float:
    """CPU time to issue one call (kernels queue without waiting): what a step pays per call outside a CUDA graph."""
    if not ON_GPU:
        return float("nan")
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * issued / calls


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(DTYPE)


def attention_case(batch: int, new: int, context: int, split: bool = False, tiles=None):
    """(triton fn, torch fn, bytes) for `batch` sequences of `new` query tokens over `context` cached ones;
    `split`: with the key splits choose_kv_splits picks for this decode step; `tiles`: these, not the ones the
    tuning chose."""
    blocks_per_seq = -(-context // BLOCK)
    k_cache, v_cache = randn(batch * blocks_per_seq, BLOCK, HKV, D), randn(batch * blocks_per_seq, BLOCK, HKV, D)
    tables = torch.randperm(batch * blocks_per_seq, device=DEVICE).view(batch, -1).int()
    q = randn(batch * new, HQ, D)
    query_start = torch.arange(0, batch * new + 1, new, device=DEVICE, dtype=torch.int32)
    context_lens = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
    dense_k, dense_v = randn(batch, HKV, context, D), randn(batch, HKV, context, D)
    dense_q = q.view(batch, new, HQ, D).transpose(1, 2)
    assert new in (1, context), "a decode step or a whole prompt: SDPA needs no explicit mask for either"

    splits = choose_kv_splits(batch, HKV, context, DEVICE) if split else 1

    def triton_fn():
        kernels.paged_attention(q, k_cache, v_cache, tables, query_start, context_lens, new, D**-0.5, splits,
                                tiles=tiles)

    def torch_fn():  # SDPA (the backend torch picks) on contiguous keys: what a dense, unpaged cache costs
        F.scaled_dot_product_attention(dense_q, dense_k, dense_v, is_causal=new > 1, enable_gqa=True)

    kv_bytes = 2 * batch * context * HKV * D * 2
    return triton_fn, torch_fn, kv_bytes + 2 * q.numel() * 2


def norm_case(tokens: int):
    x, residual, weight = randn(tokens, HIDDEN), randn(tokens, HIDDEN), randn(HIDDEN)

    def torch_fn():
        r = x + residual
        return weight * (r.float() * torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(DTYPE), r

    return (lambda: kernels.add_rms_norm(x, residual, weight, 1e-5)), torch_fn, 4 * x.numel() * 2


def rotary_case(tokens: int):
    qkv = randn(tokens, (HQ + 2 * HKV) * D)
    q, k, v = qkv[:, : HQ * D].view(tokens, HQ, D), qkv[:, HQ * D : (HQ + HKV) * D], qkv[:, (HQ + HKV) * D :]
    k, v = k.view(tokens, HKV, D), v.view(tokens, HKV, D)
    cos, sin = randn(tokens, D // 2), randn(tokens, D // 2)
    k_cache, v_cache = randn(tokens, BLOCK, HKV, D), randn(tokens, BLOCK, HKV, D)
    slots = torch.arange(tokens, device=DEVICE) * BLOCK

    def torch_fn():  # rotate-half on q and k with broadcast tables, then two index_copy_ writes
        qk = qkv[:, : (HQ + HKV) * D].view(tokens, HQ + HKV, D)
        x1, x2 = qk[..., : D // 2], qk[..., D // 2 :]
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        k_cache.view(-1, HKV, D).index_copy_(0, slots, rotated[:, HQ:])
        v_cache.view(-1, HKV, D).index_copy_(0, slots, v)

    def triton_fn():
        kernels.rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)

    return triton_fn, torch_fn, 2 * qkv.numel() * 2


def silu_case(tokens: int):
    gate_up = randn(tokens, 2 * INTERMEDIATE)
    gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]
    return (lambda: kernels.silu_mul(gate, up)), (lambda: F.silu(gate) * up), 3 * gate.numel() * 2


def cases(tiny: bool):
    if tiny:
        return {"decode attention, B 2 x ctx 40": attention_case(2, 1, 40), "add + RMSNorm, T 2": norm_case(2),
                f"prefill attention, 1 x 40 new, {PREFILL_TILES[1]}": attention_case(1, 40, 40, tiles=PREFILL_TILES[1]),
                "decode attention, B 1 x ctx 300, key splits": attention_case(1, 1, 300, split=True),
                "RoPE + KV write, T 2": rotary_case(2), "silu * up, T 1": silu_case(1)}
    return {
        "decode attention, B 1 x ctx 4096": attention_case(1, 1, 4096),
        "decode attention, B 1 x ctx 4096, key splits": attention_case(1, 1, 4096, split=True),
        "decode attention, B 4 x ctx 2048, key splits": attention_case(4, 1, 2048, split=True),
        "decode attention, B 32 x ctx 1024": attention_case(32, 1, 1024),
        "decode attention, B 128 x ctx 512": attention_case(128, 1, 512),
        "prefill attention, 1 x 2048 new": attention_case(1, 2048, 2048),
        **{f"decode attention, B 32 x ctx 1024, {t}": attention_case(32, 1, 1024, tiles=t) for t in DECODE_TILES},
        **{f"prefill attention, 1 x 2048 new, {t}": attention_case(1, 2048, 2048, tiles=t) for t in PREFILL_TILES},
        "add + RMSNorm, T 1": norm_case(1),
        "add + RMSNorm, T 2048": norm_case(2048),
        "RoPE + KV write, T 1": rotary_case(1),
        "RoPE + KV write, T 2048": rotary_case(2048),
        "silu * up, T 1": silu_case(1),
        "silu * up, T 2048": silu_case(2048),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (implied without a GPU)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()
    bandwidth = copy_gbps(DEVICE, 2**30 if ON_GPU else 2**24)
    name = torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter: not a speed measurement)"
    lines = [f"Kernels on {name}, bf16; floor = bytes moved at the measured copy bandwidth {bandwidth:.0f} GB/s", ""]
    # the tiles an engine rank would choose on this card for the Llama-3-8B shape (rows without tiles named use them)
    pool_blocks = 4096 if ON_GPU else 4
    pool = randn(pool_blocks, BLOCK, HKV, D), randn(pool_blocks, BLOCK, HKV, D)
    tuning = tune_attention(*pool, HQ, timer=None if ON_GPU else time_ms)
    lines += [f"Chosen at start-up (kernels/attention_tuning.py): {tuning.summary()}", ""]
    lines += ["| operation | triton µs | torch µs | floor µs | torch / triton | host µs per call, triton / torch |",
              "|---|---|---|---|---|---|"]
    for label, (triton_fn, torch_fn, nbytes) in cases(args.tiny or not ON_GPU).items():
        triton_us, torch_us = 1000 * time_ms(triton_fn), 1000 * time_ms(torch_fn)
        floor_us = 1e6 * nbytes / (bandwidth * 1e9)
        speedup, host = torch_us / triton_us, f"{host_us(triton_fn):.1f} / {host_us(torch_fn):.1f}"
        lines.append(f"| {label} | {triton_us:.1f} | {torch_us:.1f} | {floor_us:.1f} | {speedup:.2f}x | {host} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
