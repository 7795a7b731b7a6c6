"""`hexgen generate`: run prompts through one replica with per-stage TP degrees and layer counts."""

from __future__ import annotations

import argparse
import sys
import time

from hexgen.commands.arg_types import finite_float, model_name
from hexgen.commands.engine_args import add_engine_args
from hexgen.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with one (possibly asymmetric) replica",
        description="Generate text. The continuation goes to stdout; logs and timings to stderr. With neither "
        "--prompt nor --chat, text piped into standard input is the prompt.",
    )
    p.add_argument(
        "--model",
        type=model_name,
        default=DEFAULT_MODEL,
        help=f"embedded model name ({DEFAULT_MODEL}), an HF directory, or a .gguf file; GGUF files are converted "
        "once into $HEXGEN_CACHE_DIR, else ~/.cache/hexgen",
    )
    p.add_argument(
        "--tp",
        type=int,
        nargs="+",
        default=[1],
        metavar="T",
        help="TP degree of each pipeline stage, e.g. --tp 3 1 (default: one stage, TP 1)",
    )
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        metavar="L",
        help="layers of each stage, summing to the model's layer count (default: even split)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="raw completion text, tokenized as is; - reads it from standard input (repeat for a batch)",
    )
    p.add_argument(
        "--chat",
        action="append",
        default=[],
        metavar="TEXT",
        help="one user message sent through the model's chat template; - reads it from standard input "
        "(repeat for a batch)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="most tokens generated per prompt")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K likeliest tokens; 0 = off")
    p.add_argument("--top-p", type=finite_float, default=1.0,
                   help="sample from the likeliest tokens holding P of the mass")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling; prompt i uses seed + i (default: fresh randomness)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence (benchmarks)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    add_engine_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hexgen.engine.setup import load_for_generation
    from hexgen.launch.local import ReplicaFailed

    args.prompt, args.chat = read_prompts(args.prompt, args.chat, sys.stdin)
    job = load_for_generation(args)
    started = time.monotonic()
    replica = job.open_replica()
    try:
        job.start(replica)
        load_s = time.monotonic() - started
        single = len(job.requests) == 1
        on_text = (lambda _rid, delta: print(delta, end="", flush=True)) if single else None
        completions = job.run(replica, on_text)
    except ReplicaFailed as err:  # e.g. a rank found a bad checkpoint file: one line, not a traceback
        raise UserError(f"the replica stopped: {err}") from None
    finally:
        replica.close()
    if single:
        print()
    else:
        for completion in completions:
            print(completion.text)
    job.report(completions, load_s)
    return 0


def read_prompts(prompts: list[str], chats: list[str], stdin) -> tuple[list[str], list[str]]:
    """--prompt and --chat texts with `-` replaced by standard input; with neither flag, piped input is the prompt."""
    from_stdin = [flag for flag, texts in (("--prompt", prompts), ("--chat", chats)) for text in texts if text == "-"]
    if len(from_stdin) > 1:
        raise UserError(f"standard input can feed one prompt, but {' and '.join(f'{f} -' for f in from_stdin)} "
                        "both ask for it; pass the other text on the command line")
    if not prompts and not chats:
        if stdin is None or stdin.isatty():
            raise UserError("no prompt: give --prompt TEXT or --chat TEXT, or pipe the text into standard input")
        from_stdin, prompts = ["--prompt"], ["-"]
    if not from_stdin:
        return prompts, chats
    text = stdin.read().rstrip("\r\n") if stdin is not None else ""
    if not text.strip():
        raise UserError(f"{from_stdin[0]} reads standard input, which is empty; pipe some text in or give "
                        f"{from_stdin[0]} TEXT")
    return [text if t == "-" else t for t in prompts], [text if t == "-" else t for t in chats]
