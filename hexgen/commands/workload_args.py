"""Flags shared by `hexgen plan` and `hexgen simulate`: request shape, SLO, dispatch, cost-model knobs."""

from __future__ import annotations

import argparse

from hexgen.cluster import Cluster, builtin_gpu_types, load_cluster
from hexgen.commands.arg_types import finite_float, request_rate
from hexgen.costmodel import CostConfig, Workload
from hexgen.dispatch import POLICIES
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import UserError
from hexgen.models import ModelSpec
from hexgen.sim.workload import TokenLengths

DEFAULT_MAX_BATCH = SchedulerConfig().max_running_seqs  # one default for `hexgen serve` and the planner
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=request_rate, required=True, help="request rate, requests per second, above 0")
    slo = p.add_mutually_exclusive_group(required=True)
    slo.add_argument("--slo", type=finite_float, help="end-to-end latency deadline per request, seconds")
    slo.add_argument("--slo-scale", type=finite_float,
                     help="deadline as a multiple of the reference latency (one request on 8 x --reference-gpu)")
    p.add_argument("--reference-gpu", default="A100-40G", help="GPU type of the --slo-scale reference machine")
    p.add_argument("--prompt-tokens", default="128", help="prompt length: N, or LOW:HIGH sampled uniformly")
    p.add_argument("--output-tokens", default="64", help="output length: N, or LOW:HIGH sampled uniformly")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"sequences a replica batches at once, as `hexgen serve --max-batch` (default: "
                        f"{DEFAULT_MAX_BATCH}, the engine's; 1: one request at a time, as in the paper)")
    p.add_argument("--dispatch", default=None, choices=sorted(POLICIES),
                   help="replica choice policy (default: capacity-weighted when replicas batch, round-robin at "
                        "batch 1, as in the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request stream and the search")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                   help="weight and activation type the replicas run (`hexgen serve --dtype auto` runs bfloat16 on "
                        "GPUs from Ampere on and on CPUs with bf16 arithmetic, else float32)")
    p.add_argument("--profile", action="append", default=[], metavar="FILE",
                   help="measured device profile from `hexgen profile` (repeatable); its figures replace the "
                        "datasheet ones for its device type")


def cost_config(args: argparse.Namespace) -> CostConfig:
    return CostConfig(dtype_bytes=DTYPE_BYTES[args.dtype])


def load_profiled_cluster(args: argparse.Namespace) -> Cluster:
    """The cluster file with every --profile applied (profiles named inside the file are applied on load)."""
    from hexgen.profile import apply_profiles, load_profile

    return apply_profiles(load_cluster(args.cluster), [load_profile(p) for p in args.profile])


def batch_limit(args: argparse.Namespace, plan_meta: dict | None = None) -> int:
    """--max-batch, else the plan's, else the engine's default."""
    if args.max_batch is not None:
        if args.max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
        return args.max_batch
    value = (plan_meta or {}).get("max_batch", DEFAULT_MAX_BATCH)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"the plan's meta.max_batch must be an integer >= 1, got {value!r} (or give --max-batch)")
    return value


def dispatch_policy(args: argparse.Namespace, max_batch: int, plan_meta: dict | None = None) -> str:
    """--dispatch, else the plan's, else capacity-weighted for batching replicas and round-robin at batch 1."""
    if args.dispatch:
        return args.dispatch
    return (plan_meta or {}).get("dispatch") or ("round-robin" if max_batch == 1 else "capacity-weighted")


def token_lengths(text: str, flag: str) -> TokenLengths:
    try:
        low, _, high = text.partition(":")
        lengths = TokenLengths(int(low), int(high or low))
    except ValueError:
        raise UserError(f"{flag} takes N or LOW:HIGH (whole numbers), got {text!r}") from None
    if lengths.low < 1 or lengths.high < lengths.low:
        raise UserError(f"{flag} needs 1 <= LOW <= HIGH, got {text!r}")
    return lengths


def sizing_workload(args: argparse.Namespace, model: ModelSpec, plan_meta: dict | None = None) -> Workload:
    """The shape memory is sized for: the longest prompt and output the flags allow, and the batch limit. A
    request longer than the model's context is refused: no replica could serve it."""
    prompt = token_lengths(args.prompt_tokens, "--prompt-tokens")
    output = token_lengths(args.output_tokens, "--output-tokens")
    if prompt.high + output.high > model.max_context:
        raise UserError(f"--prompt-tokens {args.prompt_tokens} and --output-tokens {args.output_tokens} make requests "
                        f"of up to {prompt.high + output.high} tokens, beyond {model.name}'s context of "
                        f"{model.max_context}")
    return Workload(prompt.high, output.high, batch_limit(args, plan_meta))


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
