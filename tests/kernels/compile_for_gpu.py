"""Compile every kernel variant the engine launches for an H200 (sm_90) without a GPU; prints one line each.

Run as a script in a process without TRITON_INTERPRET (test_compile.py does): triton's own front end,
optimiser and the ptxas it ships turn each kernel into a cubin, which catches what the interpreter
cannot — tensor-core shape rules, types that differ between branches, register and shared-memory limits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from hexgen.engine.kernels import activation, attention, fused_norm, kv_write, rotary

H200 = GPUTarget("cuda", 90, 32)
FLOATS = {"scale_log2", "eps"}
# Integer arguments that are multiples of 16 when the engine launches these kernels for the shapes named below
# (strides and sizes of 64- and 128-wide heads, 16-token blocks): triton specialises such arguments at launch
# (and 16-byte aligned pointers), which lets it vectorise loads and pipeline them; compiling without that would
# judge different code from what runs.
ALIGNED_INTS = {"block_size", "hidden", "width", "head_dim", "half_dim"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def signature(kernel, dtype: str, pointer_dtypes: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton type strings: tensors `*dtype` (or as overridden), floats fp32, constexprs, other ints i32."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointer_dtypes.get(name, f"*{dtype}")
        else:
            types[name] = "fp32" if name in FLOATS else "i32"
    return types


def aligned(kernel, types: dict[str, str]) -> dict[tuple[int], list]:
    """The divisibility a launch gives: every pointer, every stride (but those the kernel will not specialise on)
    and the sizes in ALIGNED_INTS."""
    skip = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if types[name] != "constexpr" and name not in skip
            and (name.endswith("_ptr") or name.startswith("stride") or name in ALIGNED_INTS)}


def resource_usage(cubin: bytes) -> str:
    """Registers per thread and local-memory stack (register spills) of the cubin's kernel, as cuobjdump reads
    them from the binary: "R registers, S B stack"."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", dump)
    return f"{usage[1]} registers, {usage[2]} B stack"


def attention_variant(dtype: str, group: int, tiles: attention.Tiles, head_dim: int, split: bool = False) -> tuple:
    fp32, group_p = dtype == "fp32", triton.next_power_of_2(group)
    constexprs = dict(GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim,
                      BLOCK_Q=max(tiles.rows, group_p) // group_p, BLOCK_N=tiles.block_n, DOT_FP32=fp32,
                      SPLIT=split)
    pointers = {p: "*i32" for p in ("block_tables_ptr", "query_start_ptr", "context_lens_ptr")}
    pointers |= {"partial_ptr": "*fp32", "lse_ptr": "*fp32"}
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return attention._paged_attention_kernel, dtype, pointers, constexprs, options


VARIANTS = {  # name -> (kernel, dtype, pointer dtypes, constexprs, launch options)
    **{f"paged attention, bf16 decode, GQA 4, D 128, {t}": attention_variant("bf16", 4, t, 128)
       for t in attention.DECODE_TILES},
    **{f"paged attention, bf16 prefill, GQA 4, D 128, {t}": attention_variant("bf16", 4, t, 128)
       for t in attention.PREFILL_TILES},
    "paged attention, fp32 prefill, GQA 3, D 64": attention_variant("fp32", 3, attention.FP32_TILES, 64),
    "paged attention, fp32 prefill, GQA 4, D 128": attention_variant("fp32", 4, attention.FP32_TILES, 128),
    "paged attention, bf16 decode, key splits": attention_variant("bf16", 4, attention.DECODE_TILES[0], 128, True),
    "merge of key splits, bf16, D 128": (attention._merge_splits_kernel, "bf16",
                                        {"partial_ptr": "*fp32", "lse_ptr": "*fp32"},
                                        dict(HEAD_DIM=128, HEAD_DIM_P=128, SPLITS_P=attention.MAX_KV_SPLITS), {}),
    "add + RMSNorm, bf16, H 4096": (fused_norm._add_rms_norm_kernel, "bf16", {},
                                    dict(HAS_RESIDUAL=True, BLOCK_H=4096), {}),
    "KV write, bf16, 8 heads x 128": (kv_write._write_kv_kernel, "bf16", {"slot_ptr": "*i64"},
                                      dict(HEADS_P=8, HEAD_DIM_P=128), {}),
    "RoPE + KV write, bf16, 32 / 8 heads x 128": (rotary._rotary_write_kv_kernel, "bf16", {"slot_ptr": "*i64"},
                                                  dict(Q_HEADS_P=32, KV_HEADS_P=8, HALF_P=64),
                                                  rotary.LAUNCH_OPTIONS),
    "silu(gate) * up, bf16": (activation._silu_mul_kernel, "bf16", {}, dict(BLOCK=activation.BLOCK), {}),
}


def main() -> int:
    for name, (kernel, dtype, pointer_dtypes, constexprs, options) in VARIANTS.items():
        start = time.perf_counter()
        types = signature(kernel, dtype, pointer_dtypes, constexprs)
        source = ASTSource(kernel, types, constexprs, aligned(kernel, types))
        compiled = triton_compile(source, target=H200, options=options)
        usage = resource_usage(compiled.asm["cubin"])
        fused = len(re.findall(r"\bfma\.", compiled.asm["ptx"]))  # fused multiply-adds in the PTX
        print(f"{name}: {len(compiled.asm['cubin'])} B cubin, {compiled.metadata.shared} B shared memory, "
              f"{usage}, {fused} fma, {time.perf_counter() - start:.1f} s")
    print(f"compiled every one of the {len(VARIANTS)} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
