"""Engine flags shared by `hexgen generate` and `hexgen serve`: weight dtype, KV-cache memory and block size (no
torch)."""

from __future__ import annotations

import argparse
import sys

from hexgen.commands.arg_types import finite_float
from hexgen.commands.workload_args import DTYPE_BYTES
from hexgen.engine.kv_budget import GIB, RankShape, check_memory_budget
from hexgen.engine.scheduler import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    SchedulerConfig,
    default_block_size,
    is_valid_block_size,
)
from hexgen.errors import UserError
from hexgen.machine import cpu_has_bf16_arithmetic, cpu_lacks_bf16_matmul
from hexgen.models import ModelSpec
from hexgen.plan import Replica

MAX_MEMORY_GB = 1 << 20
MAX_SPECULATIVE_TOKENS = 16
DTYPES = ("auto", "float32", "bfloat16")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and activations; auto: bfloat16 on GPUs from Ampere on and on a CPU with bf16 "
                   "arithmetic (AVX512_BF16, AMX), else float32 (with --ray: bfloat16 on CUDA, float32 on CPUs)")
    p.add_argument(
        "--memory-gb", type=finite_float, default=None, metavar="GB",
        help="memory of each rank for its weights plus its KV cache, in GiB (default: on CUDA what is left after "
        "the weights less 10%% of the GPU; on CPU up to 2 GiB of KV cache per rank)",
    )
    p.add_argument("--block-size", type=int, default=None, metavar="TOKENS",
                   help=f"tokens per KV-cache block, a power of two in 1..{MAX_BLOCK_SIZE} (default: "
                   f"{DEFAULT_BLOCK_SIZE} on CUDA; on CPU the smallest such size from {DEFAULT_BLOCK_SIZE} whose block "
                   "holds 4 KiB of one KV head, e.g. 32 for SmolLM2 in bfloat16)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full instead of sharing the KV blocks of prefixes already cached "
                   "(common system prompts, a conversation's earlier turns); default: prefix caching on")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run decode steps kernel by kernel instead of replaying captured CUDA graphs")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="speculative decoding: up to K draft tokens per decoding sequence and step, looked up in the "
                   f"sequence's own earlier tokens (n-grams) and verified in the same step, while a step decodes at "
                   f"most {SchedulerConfig().speculative_max_seqs} sequences; the tokens are those without drafts, "
                   f"only sooner where text repeats itself; on CUDA a step with drafts runs without CUDA graphs "
                   f"(0 = off, the default; at most {MAX_SPECULATIVE_TOKENS})")
    p.add_argument("--no-overlap-steps", dest="overlap_steps", action="store_false",
                   help="on CUDA, a one-GPU replica runs its steps one after another instead of preparing the next "
                   "step while the GPU computes this one (default: overlapped; multi-rank replicas and CPUs never "
                   "overlap)")


def resolve_dtype(dtype: str, device: str, ray: bool) -> str:
    """--dtype as the engine takes it. `auto` becomes bfloat16 where the devices compute in it natively: GPUs from
    Ampere on (half fp32's bytes; what the Triton kernels and CUDA graphs were measured with) and CPUs with bf16
    arithmetic (faster there: see cpu_has_bf16_arithmetic); else float32 (older GPUs; CPUs without it, where bf16
    batches run 3-6x slower: BF16_SLOW_NOTE). With --ray the ranks' machines are not seen from here: bfloat16 on
    CUDA (pass --dtype float32 for GPUs before Ampere), float32 on CPUs."""
    if dtype != "auto":
        return dtype
    if device == "cuda":
        if ray:
            return "bfloat16"
        from hexgen.engine.devices import cuda_bf16_everywhere  # torch, for --device cuda only

        return "bfloat16" if cuda_bf16_everywhere() else "float32"
    return "bfloat16" if not ray and cpu_has_bf16_arithmetic() else "float32"


def check_engine_args(args: argparse.Namespace) -> None:
    """Ranges of the engine flags, before anything is loaded; resolves `--dtype auto` in place."""
    ray = bool(getattr(args, "ray", None))  # with --ray the ranks run elsewhere
    args.dtype = resolve_dtype(args.dtype, args.device, ray)
    if args.memory_gb is not None and not 0 < args.memory_gb <= MAX_MEMORY_GB:
        raise UserError(f"--memory-gb must be in (0, {MAX_MEMORY_GB}], got {args.memory_gb}")
    if args.block_size is not None and not is_valid_block_size(args.block_size):
        raise UserError(f"--block-size must be a power of two in 1..{MAX_BLOCK_SIZE}, got {args.block_size}")
    if not 0 <= args.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise UserError(f"--speculative-tokens must be in 0..{MAX_SPECULATIVE_TOKENS} (0 = off), "
                        f"got {args.speculative_tokens}")
    if args.device == "cpu" and not ray and args.dtype == "bfloat16" and cpu_lacks_bf16_matmul():
        print(BF16_SLOW_NOTE, file=sys.stderr)


# Measured on a 2-core AVX2 EPYC, SmolLM2-135M (README, "Engine"): bf16 decoded one sequence 1.16-1.28x faster than fp32
# (half the bytes to read) but batches of 16 3.3-3.5x slower and prefill 6x slower.
BF16_SLOW_NOTE = ("hexgen: note: --dtype bfloat16 on a CPU without bf16 matrix arithmetic (no AVX-512 BW/VL/DQ, "
                  "AVX-NE-CONVERT or AMX): one sequence decodes a little faster than float32, but batches and "
                  "prompts run 3-6x slower; --dtype float32 serves more")


def check_memory(args: argparse.Namespace, spec: ModelSpec, replicas: list[Replica], max_running_seqs: int) -> None:
    """--memory-gb must hold every rank's weights plus one KV block per running sequence."""
    if args.memory_gb is None:
        return
    ranks = [
        RankShape(stage.num_layers, stage.tp, i == 0, i == len(replica.stages) - 1)
        for replica in replicas for i, stage in enumerate(replica.stages)
    ]
    # CPU ranks hold oneDNN-packed weights (hexgen/engine/layers.py:packs_for_cpu): fp32 always, bf16 where the CPU
    # has oneDNN's bf16 products (assumed where /proc/cpuinfo says nothing: the tied table then counts twice)
    cpu_packed = args.device == "cpu" and (args.dtype == "float32" or not cpu_lacks_bf16_matmul())
    check_memory_budget(spec, ranks, int(args.memory_gb * GIB), max_running_seqs, block_size(args, spec),
                        DTYPE_BYTES[args.dtype], cpu_packed)


def block_size(args: argparse.Namespace, spec: ModelSpec) -> int:
    """--block-size, or the default for the device, the model's head size and the (resolved) dtype."""
    if args.block_size is not None:
        return args.block_size
    return default_block_size(args.device, spec.head_dim, DTYPE_BYTES[args.dtype])


def scheduler_config(
    args: argparse.Namespace, spec: ModelSpec, max_running_seqs: int, max_context: int
) -> SchedulerConfig:
    memory = None if args.memory_gb is None else int(args.memory_gb * GIB)
    return SchedulerConfig(max_running_seqs=max_running_seqs, max_context=max_context,
                           block_size=block_size(args, spec),
                           memory_bytes=memory, enforce_eager=args.enforce_eager,
                           prefix_caching=args.prefix_caching, overlap_steps=None if args.overlap_steps else False,
                           speculative_tokens=args.speculative_tokens)
