"""`hexgen generate`: run prompts through one replica with per-stage TP degrees and layer counts."""

from __future__ import annotations

import argparse
import time

DEFAULT_MODEL = "smollm2-135m"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with one (possibly asymmetric) replica",
        description="Generate text. The continuation goes to stdout; logs and timings to stderr.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded model name ({DEFAULT_MODEL}), an HF directory, or a .gguf file",
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
        help="raw completion text, tokenized as is (repeat for a batch)",
    )
    p.add_argument(
        "--chat",
        action="append",
        default=[],
        metavar="TEXT",
        help="one user message sent through the model's chat template (repeat for a batch)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling of each prompt")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence (benchmarks)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hexgen.engine.setup import load_for_generation
    from hexgen.errors import UserError
    from hexgen.launch.local import ReplicaFailed

    if not args.prompt and not args.chat:
        args.chat = ["What is the capital of France? Answer in one sentence."]
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
