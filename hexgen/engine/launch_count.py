"""What a decode step launches on a GPU, counted on any machine.

The engine's CUDA path (Triton kernels between the cuBLAS projections, attention read through the block tables,
eager: no CUDA graph) runs here on CPU tensors with Triton's interpreter, and every operation is recorded: a
Triton kernel launch by its name, a torch operation by its aten name when it would launch a kernel on a GPU.
Not counted, as a GPU profiler's kernel count does not count them: views and reshapes, allocations, host-to-device
copies of the step's metadata (`.to(device)`), the one device-to-host copy of the sampled tokens, and operations
that return their input unchanged. A projection counts as one GEMM launch (cuBLAS may add a split-K reduction).
TP degree 1: a TP group adds two all-reduces per layer.

    python -m hexgen.engine.launch_count          # the table, for a tiny model of Llama's structure

The count depends on the model's structure, not its size; the GPU's own count is `hexgen bench engine --device
cuda` (torch.profiler), which `scripts/gpu_check.sh` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

# Operations that allocate or move data between host and device, or only read a scalar back: no kernel.
_NO_KERNEL = {"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
              "aten.lift_fresh.default", "aten.detach_.default", "aten._local_scalar_dense.default"}
SMALL_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=512)  # Llama's structure: GQA, SiLU MLP, RoPE


@dataclass(frozen=True)
class DecodeLaunches:
    """Kernel launches of one decode step of `batch` sequences, by name."""

    batch: int
    sampled: bool  # temperature / top-k / top-p with seeds; else greedy
    kv_splits: int  # key ranges per sequence in the attention kernel (> 1: a second, merging launch)
    num_layers: int
    in_layers: dict[str, int]  # all decoder layers together
    outside: dict[str, int]  # embedding, final norm, LM head, RoPE table rows, picking the last rows, sampling

    @property
    def per_layer(self) -> float:
        return sum(self.in_layers.values()) / self.num_layers

    @property
    def outside_total(self) -> int:
        return sum(self.outside.values())

    def per_layer_of_model(self, num_layers: int) -> float:
        """Launches per layer per step of a model of `num_layers` layers, the step's other launches shared out."""
        return self.per_layer + self.outside_total / num_layers


def _launches_kernel(func, args, kwargs, out) -> bool:
    """Whether a torch operation would launch a kernel on a GPU (see the module's docstring)."""
    import torch

    name = str(func)
    if name in _NO_KERNEL:
        return False
    if func._schema.is_mutable:  # in place (mul_, index_copy_, fill_): a kernel
        return True
    outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
    inputs = {t.untyped_storage().data_ptr() for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)}
    # views (reshape, split, slice) and operations that may return their input (.to(), .contiguous()) launch
    # nothing when their output is their input's memory
    return bool(outputs) and not all(o.untyped_storage().data_ptr() in inputs for o in outputs)


class _Recorder:
    """Counts launches by name; torch operations inside a Triton launch (the interpreter's own) are not counted."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.in_kernel = 0

    def dispatch_mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if not recorder.in_kernel and _launches_kernel(func, args, kwargs, out):
                    recorder.counts[str(func).removesuffix(".default")] += 1
                return out

        return Mode()

    def wrap_triton_run(self, run):
        def launch(kernel, *args, **kwargs):
            self.counts[f"triton {kernel.fn.__name__.strip('_')}"] += 1
            self.in_kernel += 1
            try:
                return run(kernel, *args, **kwargs)
            finally:
                self.in_kernel -= 1

        return launch


@contextlib.contextmanager
def cuda_path_on_cpu(kv_splits: int | None = None, tile_timer=None) -> Iterator[None]:
    """CPU steps take the engine's CUDA path: the Triton kernels (interpreted), no oneDNN copies or folded norms,
    and, when given, `kv_splits` key ranges per decoding sequence (on CPU the engine picks 1). Attention tiles are
    "timed" by `tile_timer` (milliseconds for a call), by default one that times nothing and so keeps the first
    candidates: the interpreter's times say nothing about a GPU's. TRITON_INTERPRET=1 must be set before triton is
    imported."""
    from hexgen.engine import kernels, layers, ops, runner, sampler, stage

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is imported")
    from hexgen.engine.kernels import attention_tuning
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(ops, "use_triton", lambda t: True))
        patches.enter_context(mock.patch.object(runner, "triton_serves", lambda device: True))
        patches.enter_context(mock.patch.object(layers, "packs_for_cpu", lambda weight: False))
        patches.enter_context(mock.patch.object(stage, "packs_for_cpu", lambda weight: False))
        patches.enter_context(mock.patch.object(sampler, "first_argmax", lambda x: x.argmax(dim=-1)))  # as on CUDA
        if kv_splits is not None:
            patches.enter_context(mock.patch.object(kernels, "choose_kv_splits", lambda *args: kv_splits))
        patches.enter_context(mock.patch.object(attention_tuning, "cuda_timer", tile_timer or (lambda fn: 0.0)))
        yield


def decode_plan(batch: int, context: int, block_size: int, sampled: bool):
    """A decode-only StepPlan: sequence b has context + b % 5 tokens cached and brings one more, in its own blocks."""
    from hexgen.engine.messages import SampleRow, StepPlan

    starts = [context + b % 5 for b in range(batch)]
    tables, next_block = [], 0
    for start in starts:
        blocks = start // block_size + 1
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    sampling = [SampleRow(0.7, 5, 0.9, seed=b, position=s) if sampled else SampleRow(0.0, 0, 1.0, 0, s)
                for b, s in enumerate(starts)]
    return StepPlan(seq_ids=list(range(batch)), starts=starts, lengths=[1] * batch, token_ids=[b + 1 for b in
                    range(batch)], block_tables=tables, sample=[True] * batch, sampling=sampling)


def count_decode_launches(model_dir: str, batch: int, sampled: bool = False, kv_splits: int = 1,
                          context: int = 24, dtype: str = "bfloat16") -> DecodeLaunches:
    """Record one decode step of `batch` sequences on the CUDA path (after a warm-up step that sizes the RoPE
    tables, which happens once per process)."""
    import torch
    import triton.runtime.interpreter as interpreter

    from hexgen.engine import llama
    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.engine import build_runner, init_rank
    from hexgen.engine.scheduler import SchedulerConfig
    from hexgen.launch.spec import Layout, RankSpec

    block_size = 4
    source = resolve_model(model_dir, progress=False)
    layers = source.spec.num_layers
    plan = decode_plan(batch, context, block_size, sampled)
    blocks = sum(len(t) for t in plan.block_tables)
    recorder, in_layers = _Recorder(), Counter()
    layer_forward = llama.DecoderLayer.forward

    def counted_layer(layer, *args, **kwargs):
        before = recorder.counts.copy()
        out = layer_forward(layer, *args, **kwargs)
        in_layers.update(recorder.counts - before)
        return out

    with cuda_path_on_cpu(kv_splits), torch.inference_mode():
        spec = RankSpec(source, Layout((1,), ((0, layers),)), 0, dtype)
        config = SchedulerConfig(max_running_seqs=batch, num_kv_blocks=blocks, block_size=block_size,
                                 enforce_eager=True)
        runner = build_runner(spec, init_rank(spec), config)
        runner.sample(plan, *runner.forward(plan, None))  # warm-up
        with (mock.patch.object(interpreter.InterpretedFunction, "run",
                                recorder.wrap_triton_run(interpreter.InterpretedFunction.run)),
              mock.patch.object(llama.DecoderLayer, "forward", counted_layer), recorder.dispatch_mode()):
            runner.sample(plan, *runner.forward(plan, None))
    outside = recorder.counts - in_layers
    return DecodeLaunches(batch, sampled, kv_splits, layers, dict(in_layers), dict(outside))


def small_llama(directory: str) -> str:
    """A random-weight checkpoint of SMALL_LLAMA in `directory`; returns its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SMALL_LLAMA, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def markdown(rows: list[DecodeLaunches], model_layers: int) -> str:
    lines = [f"| batch | sampling | key splits | launches per layer | other launches per step | per layer of a "
             f"{model_layers}-layer model | inside a layer |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        inside = ", ".join(f"{n} x{c // r.num_layers}" for n, c in sorted(r.in_layers.items(), key=lambda i: -i[1]))
        lines.append(f"| {r.batch} | {'seeded top-k / top-p' if r.sampled else 'greedy'} | {r.kv_splits} | "
                     f"{r.per_layer:g} | {r.outside_total} | {r.per_layer_of_model(model_layers):.1f} | {inside} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hexgen.engine.launch_count", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], metavar="B")
    parser.add_argument("--model-layers", type=int, default=32, metavar="N",
                        help="share the step's other launches over this many layers (Llama-3-8B: 32)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.model_layers < 1:
        parser.error("--batch-sizes and --model-layers must be at least 1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from rich.console import Console
    from rich.progress import Progress

    cases = [(b, sampled, splits) for sampled in (False, True) for splits in (1, 2) for b in args.batch_sizes]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress(console=Console(stderr=True), transient=True) as bar:
        model = small_llama(tmp)
        task = bar.add_task("decode steps counted (Triton interpreted)", total=len(cases))
        for batch, sampled, splits in cases:
            rows.append(count_decode_launches(model, batch, sampled, splits))
            bar.advance(task)
    print(markdown(rows, args.model_layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
