"""`hexgen bench engine`: measured speed of the engine beside HF transformers (tables on stdout)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hexgen.commands.arg_types import model_name, output_file
from hexgen.errors import UserError
from hexgen.models import preset_configs

CUDA_BATCH_SIZES = (1, 8, 32, 64, 128)  # the decode-step table's rows when --device cuda gives none

DESCRIPTION = (
    "Time the engine at batch 1, greedy, on one model and machine: prefill tokens/s and decode ms/token of "
    "hexgen in one process beside HF transformers' generate (runs interleaved, median of --repeats), then of "
    "each multi-process --layout, then the raw cost of a stage boundary and of a TP all-reduce (gloo). "
    "One set of tables per --dtype, on stdout."
)


def register(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("engine", help="engine decode/prefill vs HF transformers, and the cost of splitting",
                         description=DESCRIPTION)
    p.add_argument("--model", type=model_name, default="smollm2-135m",
                   help="embedded model name, an HF directory, or a .gguf file (converted once into "
                   "$HEXGEN_CACHE_DIR, else ~/.cache/hexgen)")
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                   help="weight and activation dtypes to time, one set of tables each")
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N",
                   help="prompt length; prefill is timed on it and decode starts after it")
    p.add_argument("--new-tokens", type=int, default=32, metavar="N",
                   help="tokens generated per timed decode (at least 2)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed runs per engine and layout; the median counts")
    p.add_argument(
        "--layout",
        action="append",
        default=None,
        metavar="TP[:LAYERS]",
        help='multi-process layout to time, e.g. "3 1:20 10" (repeatable; default: 1 1, T, T 1 '
        "with T the largest valid TP degree <= 4)",
    )
    p.add_argument("--markdown", metavar="FILE", type=output_file, help="also write the tables as Markdown to FILE")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both engines run; cuda times decode steps only (one GPU: no multi-process layouts)")
    p.add_argument("--shape", choices=sorted([*preset_configs(), "tiny"]), default=None,
                   help="instead of --model, a random-weight model of this shape, built on --device (no download)")
    p.add_argument("--save-model", metavar="DIR", default=None,
                   help="with --shape: keep the random checkpoint (and a word-level tokenizer of its vocabulary) in "
                   "DIR, a new or empty folder, e.g. to serve it with `hexgen serve --model DIR`")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                   help="decode-step table at these batch sizes beside HF and the bandwidth floor "
                   f"(default: {' '.join(map(str, CUDA_BATCH_SIZES))} on cuda, none on cpu)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="cuda: time decode steps without CUDA graphs (what the graphs bring, or when capture fails)")
    p.set_defaults(run=run_engine_bench)


def parse_layout(text: str) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    tp_text, _, layers_text = text.partition(":")
    try:
        tp = tuple(int(t) for t in tp_text.split())
        layers = tuple(int(n) for n in layers_text.split()) if layers_text.strip() else None
    except ValueError:
        raise UserError(
            f'--layout {text!r}: expected "TP0 TP1 ..[:L0 L1 ..]" with integers, e.g. "3 1:20 10"'
        ) from None
    if not tp:
        raise UserError(f"--layout {text!r} names no TP degree")
    return tp, layers


def run_engine_bench(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        from hexgen.engine.omp_spin import spin_like_a_lone_rank

        spin_like_a_lone_rank()
    from hexgen.engine.bench_report import run_and_report

    for flag, value, least in (("--prompt-tokens", args.prompt_tokens, 1), ("--new-tokens", args.new_tokens, 2),
                               ("--repeats", args.repeats, 1)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    layouts = [parse_layout(t) for t in args.layout] if args.layout else None
    batch_sizes = args.batch_sizes or (list(CUDA_BATCH_SIZES) if args.device == "cuda" else None)
    check_device_flags(args.device, layouts, batch_sizes)
    check_save_model(args.save_model, args.shape)
    run_and_report(args.model, args.dtype, args.prompt_tokens, args.new_tokens, args.repeats, layouts, args.markdown,
                   args.device, args.shape, batch_sizes, args.save_model, args.enforce_eager)
    return 0


def check_device_flags(device: str, layouts: list | None, batch_sizes: list[int] | None) -> None:
    if batch_sizes and min(batch_sizes) < 1:
        raise UserError(f"--batch-sizes: every size must be >= 1, got {batch_sizes}")
    if device == "cuda":
        from hexgen.engine.devices import require_cuda

        require_cuda()
        if layouts:
            raise UserError("--layout runs on CPU only: with one GPU, multi-process layouts cannot share it")


def check_save_model(folder: str | None, shape: str | None) -> None:
    if folder is None:
        return
    if shape is None:
        raise UserError("--save-model keeps the random checkpoint of --shape; give --shape too")
    path = Path(folder)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--save-model {folder}: must be a new or empty folder (it would mix two checkpoints)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--save-model {folder}: cannot create the folder ({err.strerror})") from None
