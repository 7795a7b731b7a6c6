"""Assemble and run the server: model, plan, replicas, coordinator, uvicorn; stop everything on exit."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import uvicorn

from hexgen.dispatch import make_policy
from hexgen.engine.checkpoint import embedded_spec, eos_token_ids, resolve_model
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.plan import load_plan
from hexgen.server.app import create_app
from hexgen.server.coordinator import Coordinator, ServeConfig
from hexgen.server.launch import check_local, default_local_plan, make_replicas, start_all
from hexgen.server.metrics import Metrics
from hexgen.tokenizer import Tokenizer


async def serve(args: argparse.Namespace) -> None:
    given = replace(load_plan(args.plan), model=args.model) if args.plan else None
    known = embedded_spec(args.model)
    if given is not None and known is not None:  # a bad plan fails before a first-use conversion
        given.validate_structure(known)
    source = resolve_model(args.model)
    spec = source.spec
    plan = given or default_local_plan(spec)
    plan.validate_structure(spec)
    check_local(plan)
    tokenizer = Tokenizer(source.directory)
    max_context = min(args.max_context, spec.max_context)
    scheduler_config = SchedulerConfig(max_running_seqs=args.max_batch, max_context=max_context)
    replicas = make_replicas(source, plan, args.dtype, args.device, scheduler_config, eos_token_ids(source.directory))
    await start_all(replicas)
    try:
        config = ServeConfig(args.served_model_name or args.model, max_context, args.max_queue)
        coordinator = Coordinator(config, tokenizer, replicas, make_policy(args.dispatch), Metrics())
        app = create_app(coordinator, args.api_key, plan.to_dict())
        server = uvicorn.Server(
            uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
        )
        layout = "; ".join(
            f"replica {r.index}: " + " -> ".join(f"TP {s.tp} x {s.num_layers} layers" for s in r.plan.stages)
            for r in replicas
        )
        print(
            f"hexgen serve: ready on http://{args.host}:{args.port}/v1 serving {config.model_name!r} "
            f"({layout}; dispatch {args.dispatch})",
            file=sys.stderr,
            flush=True,
        )
        await server.serve()
    finally:
        for replica in replicas:
            await replica.close()
