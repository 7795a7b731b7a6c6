"""`hexgen bench engine`: measured speed of the engine beside HF transformers (tables on stdout)."""

from __future__ import annotations

import argparse

from hexgen.errors import UserError

DESCRIPTION = (
    "Time the engine at batch 1, greedy, on one model and machine: prefill tokens/s and decode ms/token of "
    "hexgen in one process beside HF transformers' generate (runs interleaved, median of --repeats), then of "
    "each multi-process --layout, then the raw cost of a stage boundary and of a TP all-reduce (gloo). "
    "One set of tables per --dtype, on stdout."
)


def register(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("engine", help="engine decode/prefill vs HF transformers, and the cost of splitting",
                         description=DESCRIPTION)
    p.add_argument("--model", default="smollm2-135m",
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
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown to FILE")
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
    from hexgen.engine.bench_report import run_and_report

    for flag, value, least in (("--prompt-tokens", args.prompt_tokens, 1), ("--new-tokens", args.new_tokens, 2),
                               ("--repeats", args.repeats, 1)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    layouts = [parse_layout(t) for t in args.layout] if args.layout else None
    run_and_report(args.model, args.dtype, args.prompt_tokens, args.new_tokens, args.repeats, layouts, args.markdown)
    return 0
