"""`hexgen serve`: start every replica of a plan and an OpenAI-compatible HTTP server in front of them."""

from __future__ import annotations

import argparse
import asyncio
import sys

from hexgen.commands.arg_types import finite_float, model_name
from hexgen.commands.engine_args import add_engine_args, check_engine_args
from hexgen.engine.scheduler import DEFAULT_MAX_RUNNING_SEQS
from hexgen.errors import UserError

POLICIES = ("least-outstanding", "round-robin", "capacity-weighted")
DEFAULT_SHUTDOWN_GRACE_S = 5.0
MAX_SHUTDOWN_GRACE_S = 3600.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a plan's replicas behind an OpenAI-compatible API",
        description="Serve the model over the replicas of a plan (default: two local replicas, "
        "one of them two stages with unequal TP degrees).",
    )
    p.add_argument("--model", type=model_name, default="smollm2-135m",
                   help="embedded model name, an HF directory, or a .gguf file")
    p.add_argument("--plan", help="plan JSON (from `hexgen plan`); its machines are 'localhost' unless --ray")
    p.add_argument("--ray", metavar="HEAD_HOST:PORT",
                   help="run each stage on the Ray cluster's machine the plan names (see `hexgen node`)")
    p.add_argument("--replan", action="store_true",
                   help="with --ray: when a machine is lost, re-plan its replicas on the free slots of live machines")
    p.add_argument("--cluster", help="with --replan: the cluster YAML (from `hexgen cluster probe`) to re-plan on")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the name clients send as 'model' (default: --model)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dispatch",
        choices=POLICIES,
        default=None,
        help="how the coordinator picks a replica (the simulator's policies); default: the plan's choice "
        "(meta.dispatch), else capacity-weighted when the replicas differ, else least-outstanding",
    )
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_RUNNING_SEQS, help="sequences a replica runs at once")
    add_engine_args(p)
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--max-context", type=int, default=4096, help="tokens per sequence (capped by the model's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--allowed-origins", metavar="ORIGINS",
                   help="web pages whose scripts may call the server (CORS): comma-separated origins such as "
                        "http://localhost:3000, or * for every page (default: none)")
    p.add_argument("--shutdown-grace-s", type=finite_float, default=DEFAULT_SHUTDOWN_GRACE_S, metavar="S",
                   help="on SIGINT / SIGTERM, new requests get a 503 at once and running ones have S seconds to "
                        "finish before they end with a 503")
    p.set_defaults(run=run)


def parse_origins(text: str | None) -> tuple[str, ...]:
    """--allowed-origins as a tuple; each origin as a browser sends it (scheme://host[:port]: one with a path or a
    trailing slash would never match), or *."""
    if text is None:
        return ()
    origins = tuple(origin.strip() for origin in text.split(","))
    for origin in origins:
        scheme, _, host = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not host or "/" in host or " " in host):
            raise UserError(f"--allowed-origins takes comma-separated origins (scheme://host[:port], e.g. "
                            f"http://localhost:3000) or *, got {origin!r} in {text!r}")
    return origins


def run(args: argparse.Namespace) -> int:
    for flag in ("max_batch", "max_queue"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_context < 2:  # a one-token prompt and one generated token
        raise UserError(f"--max-context must be >= 2, got {args.max_context}")
    for flag in ("api_key", "served_model_name", "plan", "cluster"):  # an empty key would let every request in
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise UserError(f"--{flag.replace('_', '-')} must not be empty (leave it out for the default)")
    if not args.host.strip():  # the empty host binds every interface: say so with 0.0.0.0 instead
        raise UserError("--host must not be empty: 127.0.0.1 (the default) for this machine only, 0.0.0.0 for every "
                        "interface")
    if not 0 <= args.shutdown_grace_s <= MAX_SHUTDOWN_GRACE_S:
        raise UserError(f"--shutdown-grace-s must be in 0..{MAX_SHUTDOWN_GRACE_S:.0f}, got {args.shutdown_grace_s:g}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    args.allowed_origins = parse_origins(args.allowed_origins)
    check_engine_args(args)
    if args.replan and not (args.ray and args.cluster):
        raise UserError("--replan needs --ray and --cluster (the cluster YAML the planner re-plans on)")
    if args.cluster and not args.replan:
        raise UserError("--cluster is the cluster YAML --replan re-plans on: it needs --replan")
    if args.ray and not args.plan:
        raise UserError("--ray needs --plan: a plan naming the cluster's machines (`hexgen cluster probe`, then "
                        "`hexgen plan`)")
    from hexgen.server.replica_client import ReplicaStartError
    from hexgen.server.serve import serve

    try:
        asyncio.run(serve(args))
    except ReplicaStartError as err:  # a rank's own message says why
        print(f"hexgen serve: error: {err}", file=sys.stderr)
        return 1
    return 0
