"""`hexgen bench serve`: load any OpenAI-compatible server and report latency percentiles, tokens/s and SLOs."""

from __future__ import annotations

import argparse
import os

from hexgen.commands.arg_types import finite_float, model_name, output_file
from hexgen.errors import UserError
from hexgen.folders import read_text


def register(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "serve", help="drive an OpenAI-compatible server (this one or any other) and time it",
        description="Drive an OpenAI-compatible server with streamed requests and report TTFT, TPOT, latency "
        "percentiles, tokens/s and SLO attainment; from a hexgen server also its engines' share of the run (steps, "
        "mean step time, tokens per step, how busy its drivers were), read from its /status before and after.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL, ending in /v1")
    p.add_argument("--model", type=model_name, required=True, help="model name the server expects")
    p.add_argument("--concurrency", type=int, help="closed loop: N streams, each sending when its last one ends "
                                                   "(default: 1; not with --rate)")
    p.add_argument("--rate", type=finite_float,
                   help="open loop: Poisson arrivals at R requests/s (not with --concurrency)")
    p.add_argument("--num-requests", type=int, help="measured requests (default: 32; not with --duration-s)")
    p.add_argument("--duration-s", type=finite_float, help="send new requests for this many seconds instead")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request asks for")
    p.add_argument("--prompt", help="prompt text (default: a fixed story opening)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="prompts sent in turn, one a line (blank lines skipped; not with --prompt), e.g. what "
                        "`scripts/long_prompt.py 1000 --count 64` prints: long contexts no two requests share")
    p.add_argument("--chat", action="store_true", help="use /chat/completions instead of /completions")
    p.add_argument("--ignore-eos", action="store_true",
                   help='send "ignore_eos": true (vLLM, llama.cpp) so every request makes max_tokens tokens')
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="ask for each token's log-probability and its N most likely alternatives' (0-20)")
    p.add_argument("--no-usage", action="store_true",
                   help="do not ask for usage in the stream (stream_options); count content chunks instead")
    p.add_argument("--warmup", type=int, default=1, help="requests sent first and not measured")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--timeout-s", type=finite_float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--slo-ttft-s", type=finite_float, help="SLO on time to first token")
    p.add_argument("--slo-tpot-s", type=finite_float, help="SLO on time per output token")
    p.add_argument("--slo-e2e-s", type=finite_float, help="SLO on end-to-end latency")
    p.add_argument("--json", metavar="FILE", type=output_file,
                   help="also save config, summary and every request as JSON")
    p.set_defaults(run=run_serve_bench)


def _default_unless(value, alternative, default):
    """`value` as given; else `default`, unless the alternative flag was given (BenchConfig rejects both)."""
    if value is not None or alternative is not None:
        return value
    return default


def check_url(url: str) -> None:
    """--url: an http(s) URL with a host and, if any, a valid port."""
    import httpx

    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as err:
        raise UserError(f"--url {url!r}: not a valid URL ({err})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host or not (port is None or 0 < port < 65536):
        raise UserError(f"--url {url!r}: expected an http(s) URL, http://HOST:PORT/v1 with a port in 1..65535")


def config_from_args(args: argparse.Namespace):
    from hexgen.benchserve.config import DEFAULT_PROMPT, BenchConfig, SloTargets

    check_url(args.url)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty: give some text, or leave it out for the default prompt")
    prompts: tuple[str, ...] = ()
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise UserError("give one of --prompt and --prompts-file")
        text = read_text(args.prompts_file, "--prompts-file", UserError)
        prompts = tuple(line for line in text.splitlines() if line.strip())
        if not prompts:
            raise UserError(f"--prompts-file {args.prompts_file}: no prompt in it (one a line)")
    return BenchConfig(
        base_url=args.url.rstrip("/"), model=args.model, prompt=args.prompt or DEFAULT_PROMPT, prompts=prompts,
        max_tokens=args.max_tokens, concurrency=_default_unless(args.concurrency, args.rate, 1), rate_rps=args.rate,
        num_requests=_default_unless(args.num_requests, args.duration_s, 32), duration_s=args.duration_s,
        warmup_requests=args.warmup, chat=args.chat, ignore_eos=args.ignore_eos, logprobs=args.logprobs,
        request_usage=not args.no_usage,
        api_key=args.api_key, seed=args.seed, timeout_s=args.timeout_s,
        slo=SloTargets(args.slo_ttft_s, args.slo_tpot_s, args.slo_e2e_s))


def run_serve_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hexgen.benchserve.loadgen import run_benchmark
    from hexgen.benchserve.metrics import summarize
    from hexgen.benchserve.report import make_progress, print_report, write_json

    config = config_from_args(args)
    console = Console()
    with make_progress(console) as progress:
        task = progress.add_task(f"{config.mode}", total=config.num_requests, failed=0)
        failed = 0

        def on_result(result) -> None:
            nonlocal failed
            failed += not result.is_ok
            progress.update(task, advance=1, failed=failed)

        run = run_benchmark(config, on_result)
    summary = summarize(run)
    print_report(console, run, summary)
    if args.json:
        write_json(args.json, run, summary)
    return 0 if summary.completed else 1
