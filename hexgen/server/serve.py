"""Assemble and run the server: HTTP port, model, plan, replicas, coordinator, uvicorn; stop everything on exit."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from dataclasses import replace
from typing import Any

import uvicorn

from hexgen.cluster import load_cluster
from hexgen.commands.engine_args import DTYPE_BYTES, check_memory
from hexgen.commands.engine_args import scheduler_config as engine_scheduler_config
from hexgen.dispatch import make_policy
from hexgen.engine.checkpoint import embedded_spec, eos_token_ids, resolve_model
from hexgen.errors import PlanError, UserError
from hexgen.models import ModelSpec, load_model_spec
from hexgen.plan import Replica, load_plan
from hexgen.server.app import create_app
from hexgen.server.calibrate import measure_speeds, needs_measured_speeds
from hexgen.server.coordinator import SHUTTING_DOWN, Coordinator, ServeConfig, served_context
from hexgen.server.launch import (
    check_local,
    default_cuda_plan,
    default_dispatch,
    default_local_plan,
    make_replicas,
    start_all,
)
from hexgen.server.metrics import Metrics
from hexgen.server.replica_client import ReplicaClient
from hexgen.tokenizer import Tokenizer


class DrainingServer(uvicorn.Server):
    """uvicorn, shutting down in order: at the first SIGINT / SIGTERM it stops accepting connections and the
    coordinator answers new requests with a 503; requests still running grace_s later end with a 503 of their own
    (a stream: an error event, then [DONE]), before uvicorn's grace runs out and would cancel them mid-response."""

    def __init__(self, app: Any, coordinator: Coordinator, grace_s: float):
        # uvicorn's own grace, after which it cancels what still runs, outlasts ours by the time to send the 503s
        super().__init__(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace_s + 3))
        self.coordinator = coordinator
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit and self._loop is not None:  # the signal handler runs between the loop's callbacks
            self._loop.call_soon_threadsafe(self._drain)
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        self.coordinator.stop_admitting()
        assert self._loop is not None
        self._loop.call_later(self.grace_s, self.coordinator.end_requests, SHUTTING_DOWN)


def bind_http(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before any replica loads, so a taken port fails first."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host") from None
    return sock


def check_cuda_devices(plan) -> None:
    """--device cuda needs CUDA and every GPU index the plan names, before any process starts."""
    from hexgen.engine.devices import cuda_device_count

    visible = cuda_device_count()
    wanted = max(g for replica in plan.replicas for stage in replica.stages for g in stage.gpus) + 1
    if visible < wanted:
        raise UserError(f"--device cuda: the plan uses GPU indices up to {wanted - 1} but {visible} CUDA device(s) "
                        "are visible; use --device cpu or a plan for this machine")


async def serve(args: argparse.Namespace) -> None:
    sock = bind_http(args.host, args.port)
    try:
        await _serve(args, sock)
    finally:
        sock.close()
        if args.ray:
            import ray

            ray.shutdown()


def check_plan_model(planned: str, served: str, model: ModelSpec) -> None:
    """PlanError when the plan names a model (a preset or a readable config) whose shape is not the served one's."""
    try:
        shape = load_model_spec(planned)
    except (UserError, OSError, ValueError):
        return  # e.g. a path that exists only on the planning machine: the structure check still applies
    fields = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size")
    if any(getattr(shape, f) != getattr(model, f) for f in fields):
        raise PlanError(
            f"the plan is for model {planned!r} ({shape.num_layers} layers, hidden size {shape.hidden_size}) but "
            f"--model {served!r} has {model.num_layers} layers, hidden size {model.hidden_size}; make a plan for "
            f"it with `hexgen plan --model {served}`"
        )


async def _serve(args: argparse.Namespace, sock: socket.socket) -> None:
    loaded = load_plan(args.plan) if args.plan else None
    given = replace(loaded, model=args.model) if loaded else None
    known = embedded_spec(args.model)
    if loaded is not None and known is not None:  # a bad plan fails before a first-use conversion
        check_plan_model(loaded.model, args.model, known)
        given.validate_structure(known)
        check_memory(args, known, given.replicas, args.max_batch)
    cluster = load_cluster(args.cluster) if args.replan else None
    if args.ray:
        from hexgen.raycluster.env import connect, machine_slots
        from hexgen.server.ray_launch import check_against_cluster

        connect(args.ray)
        check_against_cluster(given, machine_slots())
    source = resolve_model(args.model)
    spec = source.spec
    if loaded is not None:
        check_plan_model(loaded.model, args.model, spec)
    if given is None and args.device == "cuda" and not args.ray:
        from hexgen.engine.devices import cuda_memory_bytes, require_cuda

        require_cuda()
        plan = default_cuda_plan(spec, cuda_memory_bytes(), DTYPE_BYTES[args.dtype])
        print(f"hexgen serve: no --plan: {plan.meta['layout']} over this machine's GPUs (`hexgen plan` makes one "
              "for your cluster and workload)", file=sys.stderr)
    else:
        plan = given or default_local_plan(spec)
    plan.validate_structure(spec)
    check_memory(args, spec, plan.replicas, args.max_batch)
    if args.device == "cuda" and not args.ray:
        check_cuda_devices(plan)
    tokenizer = Tokenizer(source.directory)
    max_context = min(args.max_context, spec.max_context)
    scheduler_config = engine_scheduler_config(args, spec, args.max_batch, max_context)
    eos = eos_token_ids(source.directory)
    if args.ray:
        import ray

        from hexgen.raycluster.env import machine_threads
        from hexgen.server.ray_launch import make_ray_replica

        host, threads = ray.util.get_node_ip_address(), machine_threads()

        def make_replica(index: int, replica: Replica) -> ReplicaClient:
            return make_ray_replica(index, source, replica, args.dtype, args.device, scheduler_config, eos, host,
                                    threads)

        replicas = [make_replica(i, replica) for i, replica in enumerate(plan.replicas)]
    else:
        check_local(plan)
        replicas = make_replicas(source, plan, args.dtype, args.device, scheduler_config, eos)
    await start_all(replicas)
    watcher = None
    try:
        note_small_pools(replicas, max_context)
        config = ServeConfig(args.served_model_name or args.model, served_context(max_context, replicas),
                             args.max_queue, args.dtype, args.device, spec.vocab_size)
        args.dispatch = args.dispatch or default_dispatch(plan)
        if needs_measured_speeds([r.predicted for r in plan.replicas], args.dispatch):
            speeds = await measure_speeds(replicas)
            print("hexgen serve: the plan has no predictions; replica speeds measured (decode tokens/s alone), "
                  "the fastest idle one takes a lone request: "
                  + ", ".join(f"replica {i}: {w:.1f}" for i, w in speeds.items()), file=sys.stderr, flush=True)
        coordinator = Coordinator(config, tokenizer, replicas, make_policy(args.dispatch), Metrics())
        if cluster is not None:
            from hexgen.raycluster.env import machine_slots
            from hexgen.server.replan import Replanner, plan_request

            replanner = Replanner(replicas, cluster, spec, plan_request(plan), make_replica, machine_slots)
            watcher = asyncio.create_task(replanner.watch())
        app = create_app(coordinator, args.api_key, plan.to_dict(), args.allowed_origins)
        server = DrainingServer(app, coordinator, args.shutdown_grace_s)
        where = (lambda s: f" on {s.machine}") if args.ray else (lambda s: "")
        layout = "; ".join(
            f"replica {r.index}: " + " -> ".join(f"TP {s.tp} x {s.num_layers} layers{where(s)}" for s in r.plan.stages)
            for r in replicas
        )
        sock.listen(2048)
        print(
            f"hexgen serve: ready on http://{args.host}:{args.port}/v1 serving {config.model_name!r} "
            f"({layout}; {args.dtype} on {args.device}; dispatch {args.dispatch})",
            file=sys.stderr,
            flush=True,
        )
        await server.serve(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.cancel()
        for replica in replicas:
            await replica.close()


def note_small_pools(replicas: list[ReplicaClient], max_context: int) -> None:
    """Say which replicas' KV pools hold shorter sequences than the server's context: requests longer than a
    replica's pool go to the others, and one longer than every pool gets a 400 (Coordinator._choose)."""
    largest = served_context(max_context, replicas)
    for replica in replicas:
        if replica.state.max_context is not None and replica.state.max_context < max_context:
            where = "go to replicas that hold them" if replica.state.max_context < largest else "get a 400"
            print(f"hexgen serve: replica {replica.index}'s KV cache holds {replica.state.max_context} tokens a "
                  f"sequence, less than the context of {max_context}: longer requests {where} (--memory-gb sets "
                  "the room for it)", file=sys.stderr, flush=True)
