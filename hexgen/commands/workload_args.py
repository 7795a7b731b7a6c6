"""Flags shared by `hexgen plan` and `hexgen simulate`: request shape, SLO, dispatch, cost-model knobs."""

from __future__ import annotations

import argparse

from hexgen.cluster import builtin_gpu_types
from hexgen.costmodel import CostConfig, Workload
from hexgen.dispatch import POLICIES
from hexgen.errors import UserError
from hexgen.models import ModelSpec
from hexgen.sim.workload import TokenLengths


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, required=True, help="request rate, requests per second")
    slo = p.add_mutually_exclusive_group(required=True)
    slo.add_argument("--slo", type=float, help="end-to-end latency deadline per request, seconds")
    slo.add_argument("--slo-scale", type=float,
                     help="deadline as a multiple of the reference latency (one request on 8 x --reference-gpu)")
    p.add_argument("--reference-gpu", default="A100-40G", help="GPU type of the --slo-scale reference machine")
    p.add_argument("--prompt-tokens", default="128", help="prompt length: N, or LOW:HIGH sampled uniformly")
    p.add_argument("--output-tokens", default="64", help="output length: N, or LOW:HIGH sampled uniformly")
    p.add_argument("--max-batch", type=int, default=1,
                   help="sequences a replica batches at once (1: one request at a time, as in the paper)")
    p.add_argument("--dispatch", default="round-robin", choices=sorted(POLICIES), help="replica choice policy")
    p.add_argument("--seed", type=int, default=0, help="seed of the request stream and the search")


def token_lengths(text: str, flag: str) -> TokenLengths:
    try:
        low, _, high = text.partition(":")
        lengths = TokenLengths(int(low), int(high or low))
    except ValueError:
        raise UserError(f"{flag} takes N or LOW:HIGH (whole numbers), got {text!r}") from None
    if lengths.low < 1 or lengths.high < lengths.low:
        raise UserError(f"{flag} needs 1 <= LOW <= HIGH, got {text!r}")
    return lengths


def sizing_workload(args: argparse.Namespace) -> Workload:
    """The shape memory is sized for: the longest prompt and output the flags allow."""
    prompt = token_lengths(args.prompt_tokens, "--prompt-tokens")
    output = token_lengths(args.output_tokens, "--output-tokens")
    return Workload(prompt.high, output.high, args.max_batch)


def slo_seconds(args: argparse.Namespace, model: ModelSpec, cfg: CostConfig) -> tuple[float, float]:
    """(deadline in seconds, reference latency in seconds) from --slo or --slo-scale."""
    from hexgen.planner.baselines import reference_latency_s

    gpus = builtin_gpu_types()
    if args.reference_gpu not in gpus:
        raise UserError(f"--reference-gpu {args.reference_gpu!r} is unknown; known: {', '.join(sorted(gpus))}")
    prompt = token_lengths(args.prompt_tokens, "--prompt-tokens")
    output = token_lengths(args.output_tokens, "--output-tokens")
    mean_shape = Workload(round(prompt.mean), round(output.mean), 1)
    try:
        reference = reference_latency_s(model, mean_shape, cfg, gpus[args.reference_gpu])
    except ValueError as err:
        if args.slo is None:
            raise UserError(f"--slo-scale needs a reference latency: {err}; give --slo in seconds") from None
        reference = float("nan")
    if args.slo is not None:
        if args.slo <= 0:
            raise UserError(f"--slo must be positive seconds, got {args.slo}")
        return args.slo, reference
    if args.slo_scale <= 0:
        raise UserError(f"--slo-scale must be positive, got {args.slo_scale}")
    return args.slo_scale * reference, reference
