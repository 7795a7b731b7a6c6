"""Helpers shared by the engine tests: HF references, in-process and multi-process engine runs.

Spawned ranks import this module by name (pytest puts tests/engine on sys.path and spawn children
inherit it), so everything a child runs lives here rather than in a test module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.utils._python_dispatch import TorchDispatchMode

from hexgen.engine import cuda_graphs
from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.engine import Engine, build_runner, follow_driver, init_rank
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.launch.lifetime import free_port
from hexgen.launch.spec import RankSpec, layout_of
from hexgen.plan import single_replica_plan


def random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def greedy_requests(prompts: list[list[int]], max_new_tokens: int, tag: str = "r") -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return [GenerationRequest(f"{tag}{i}", tuple(p), params) for i, p in enumerate(prompts)]


# ---------------------------------------------------------------- the reference: HF transformers

def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation and its per-step logits [steps, V] (fp32)."""
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # run exactly max_new_tokens, like ignore_eos
    try:
        with torch.no_grad():
            # an explicit mask: given only pad_token_id, generate() would hide every prompt token equal to it
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        model.generation_config.eos_token_id = saved_eos
    tokens = out.sequences[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens
    return tokens, torch.cat(out.logits, dim=0).float()


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


# ---------------------------------------------------------------- our engine, one process

def run_in_process(source, requests: list[GenerationRequest], config: SchedulerConfig | None = None,
                   eos_token_ids: tuple[int, ...] = (), device: str = "cpu", engines: list | None = None,
                   dtype: str = "float32", events: list | None = None, gpu_index: int = 0,
                   ) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """Drive Engine.step() to completion on TP [1]; per request: tokens and per-step logits [steps, V] (none when
    the engine overlaps its steps, as on CUDA by default: the runner's last logits are then a step ahead of the
    events). `engines`, when given, receives the engine (to read its scheduler's counters afterwards); `events`
    every TokenEvent; `gpu_index`: which GPU, on CUDA."""
    plan = single_replica_plan(source.spec, [1], None)
    spec = RankSpec(source, layout_of(plan.replicas[0], device), 0, dtype=dtype, device=device, gpu_index=gpu_index)
    config = config or SchedulerConfig(max_context=source.spec.max_context)
    runner = build_runner(spec, init_rank(spec), config)
    runner.record_logits = True
    engine = Engine.create(runner, config, eos_token_ids)
    if engines is not None:
        engines.append(engine)
    for request in requests:
        engine.add(request)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    logits: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    while engine.has_work:
        step_events = engine.step()
        if events is not None:
            events.extend(step_events)
        sampled = [e for e in step_events if e.token_id is not None]
        for row, event in enumerate(sampled):
            tokens[event.request_id].append(event.token_id)
            if not engine.overlap:
                logits[event.request_id].append(runner.last_logits[row].cpu().clone())
    return tokens, {rid: torch.stack(rows) for rid, rows in logits.items() if rows}


# ---------------------------------------------------------------- our engine, spawned gloo ranks

def spawn_ranks(fn, world_size: int, args: tuple) -> None:
    """Run fn(rank, port, *args) in world_size spawned processes; raises if any rank fails."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    port = free_port()
    tmp.start_processes(fn, args=(port, *args), nprocs=world_size, join=True, start_method="spawn")


# Host syncs (item(), a mask's nonzero, a tensor's truth) and tensors made from host data: not allowed in a capture.
NOT_IN_A_GRAPH = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
                  "aten.lift_fresh.default", "aten.lift_fresh_copy.default"}


class _OpRecorder(TorchDispatchMode):
    """Records every op a capture runs (on the tensors it ran on) as a replay: in-place ops and functional ops
    alike re-run on the recorded tensors, a functional op's result copied into the recorded output; views alias
    what they view, so they need nothing. A TP all-reduce is one too (c10d's, in place), as NCCL's is captured in
    a CUDA graph."""

    def __init__(self, replays: list[Callable[[], None]], refused: list[str]):
        super().__init__()
        self.replays, self.refused = replays, refused
        self.in_kernel = 0  # aten ops the interpreter runs inside a Triton launch belong to that launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_kernel or getattr(func, "is_view", False):
            return out
        if str(func) in NOT_IN_A_GRAPH:
            self.refused.append(str(func))
        if func._schema.is_mutable:
            self.replays.append(lambda: func(*args, **kwargs))
        else:
            outs = out if isinstance(out, tuple | list) else (out,)

            def replay() -> None:
                fresh = func(*args, **kwargs)
                for dst, src in zip(outs, fresh if isinstance(fresh, tuple | list) else (fresh,), strict=True):
                    if isinstance(dst, torch.Tensor):
                        dst.copy_(src)
                    elif hasattr(src, "wait"):  # a collective (c10d's all-reduce): in a graph, done in stream order
                        src.wait()

            self.replays.append(replay)
        return out


class RecordedReplays(cuda_graphs.DecodeGraphs):
    """DecodeGraphs on CPU, replayed as a CUDA graph replays: what the capture launched (aten ops and Triton
    kernels, with their tensors and arguments as they were then), in order, without running the layers' Python
    again. So a value the Python computed at capture (key splits, grids, a table's width, a scalar argument) stays
    what it was, as in a real graph. What a real graph adds (capture, recorded launches on a GPU) is left to the
    `gpu` tests (tests/engine/test_kernel_path.py)."""

    replayed: list[int] = []  # bucket of every replay, across instances
    aliased = 0  # outputs returned that share memory with a static output (the next replay would overwrite them)
    refused: list[str] = []  # ops a capture may not run (host syncs, tensors from host data), as they came

    def run(self, plan, hidden: torch.Tensor) -> torch.Tensor:
        out = super().run(plan, hidden)
        static = {o.untyped_storage().data_ptr() for o in self.outputs.values()}
        RecordedReplays.aliased += out.untyped_storage().data_ptr() in static
        return out

    def _record(self, run: Callable[[], torch.Tensor], device: torch.device):
        from triton.runtime.interpreter import InterpretedFunction

        replays: list[Callable[[], None]] = []
        recorder = _OpRecorder(replays, RecordedReplays.refused)
        launch = InterpretedFunction.run

        def recorded_launch(kernel, *args, **kwargs):
            replays.append(lambda: launch(kernel, *args, **kwargs))
            recorder.in_kernel += 1
            try:
                return launch(kernel, *args, **kwargs)
            finally:
                recorder.in_kernel -= 1

        with mock.patch.object(InterpretedFunction, "run", recorded_launch), recorder:
            output = run()
        bucket = output.shape[0]

        def replay() -> None:
            RecordedReplays.replayed.append(bucket)
            for step in replays:
                step()

        return replay, output


@contextlib.contextmanager
def cuda_path_ranks(kv_splits: int) -> contextlib.AbstractContextManager:
    """In a spawned CPU rank, the engine as a CUDA rank runs it: the Triton kernels (interpreted), decode graphs
    stood in for by RecordedReplays (their TP all-reduces recorded and replayed with them), `kv_splits` key ranges
    per decoding sequence, and TP all-reduces over the process group as NCCL's would be (not the CPU's
    shared-memory shortcut)."""
    from hexgen.engine.launch_count import cuda_path_on_cpu

    os.environ["HEXGEN_SHM_ALLREDUCE"] = "0"
    cuda_graphs.DecodeGraphs = RecordedReplays  # this process is the rank's own: nothing to restore
    with cuda_path_on_cpu(kv_splits=kv_splits):
        yield


def run_layout_with_logits(model_dir: Path, tp: list[int], layers: list[int], requests: list[GenerationRequest],
                           out_dir: Path, depth: int = 0, config: SchedulerConfig | None = None,
                           cuda_path_kv_splits: int | None = None,
                           ) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """Run `requests` on a spawned replica of the given layout, `depth` micro-batches in flight (0: one per
    stage, as on GPUs); tokens from the driver, per-step logits recorded on the last stage's leader
    (StageRunner.record_logits), matched by step. The driver's prefix-cache hits go to out_dir/hits.pt. With
    `cuda_path_kv_splits`, every rank runs the CUDA path on CPU (cuda_path_ranks) and saves the buckets of the
    decode graphs it replayed to out_dir/replays<rank>.pt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn_ranks(_logits_rank, sum(tp), (str(model_dir), tp, layers, requests, str(out_dir), depth, config,
                                        cuda_path_kv_splits))
    steps = torch.load(out_dir / "events.pt")  # per step: [(request_id, token, logprobs, prompt's)] in row order
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for events in steps:
        for rid, token, *_ in events:
            tokens[rid].append(token)
    if config is not None and config.speculative_tokens:  # a step's drawn rows are not its tokens: no logits
        return tokens, {}
    layout_leader = sum(tp[:-1])
    step_logits = torch.load(out_dir / f"logits{layout_leader}.pt")
    assert len(steps) == len(step_logits)
    logits: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    for events, rows in zip(steps, step_logits, strict=True):
        assert rows.shape[0] == len(events)
        for row, (rid, *_) in enumerate(events):
            logits[rid].append(rows[row])
    return tokens, {rid: torch.stack(r) for rid, r in logits.items()}


def layout_logprobs(out_dir: Path, prompt: bool = False) -> dict[str, list]:
    """Per request, each token's (log-probability, top alternatives) of the last run_layout_with_logits into
    out_dir (None where the request asked for none); with `prompt`, what each token's event carried of the
    prompt's scores (a list of such pairs on the first, else None)."""
    logprobs: dict[str, list] = {}
    for events in torch.load(out_dir / "events.pt"):
        for rid, _, token_logprobs, prompt_logprobs in events:
            logprobs.setdefault(rid, []).append(prompt_logprobs if prompt else token_logprobs)
    return logprobs


def plain_logprobs(logprobs) -> tuple[float, tuple] | None:
    """TokenLogprobs as plain values (torch.load reads no dataclasses)."""
    return None if logprobs is None else (logprobs.logprob, logprobs.top)


def _logits_rank(rank: int, port: int, model_dir: str, tp: list[int], layers: list[int],
                 requests: list[GenerationRequest], out_dir: str, depth: int,
                 config: SchedulerConfig | None, cuda_path_kv_splits: int | None) -> None:
    if cuda_path_kv_splits is None:
        _record_logits(rank, port, model_dir, tp, layers, requests, out_dir, depth, config)
        return
    with cuda_path_ranks(cuda_path_kv_splits):
        _record_logits(rank, port, model_dir, tp, layers, requests, out_dir, depth, config)
    torch.save(list(RecordedReplays.replayed), Path(out_dir) / f"replays{rank}.pt")  # buckets this rank replayed


def _record_logits(rank: int, port: int, model_dir: str, tp: list[int], layers: list[int],
                   requests: list[GenerationRequest], out_dir: str, depth: int,
                   config: SchedulerConfig | None) -> None:
    source = resolve_model(model_dir, progress=False)
    plan = single_replica_plan(source.spec, tp, layers)
    layout = dataclasses.replace(layout_of(plan.replicas[0], "cpu"), depth=depth)
    spec = RankSpec(source, layout, rank, num_threads=1, master_port=port)
    ctx = init_rank(spec)
    config = config or SchedulerConfig(max_context=source.spec.max_context)
    runner = build_runner(spec, ctx, config)
    runner.record_logits = True
    recorded: list[torch.Tensor] = []
    sample = runner.sample

    def sample_and_record(plan, hidden, last_rows):
        sampled = sample(plan, hidden, last_rows)
        if runner.last_logits is not None:
            recorded.append(runner.last_logits.clone())
            runner.last_logits = None
        return sampled

    runner.sample = sample_and_record
    if ctx.is_driver:
        engine = Engine.create(runner, config, ())
        for request in requests:
            engine.add(request)
        steps = []
        while engine.has_work:
            events = [(e.request_id, e.token_id, plain_logprobs(e.logprobs),
                       None if e.prompt_logprobs is None else [plain_logprobs(s) for s in e.prompt_logprobs])
                      for e in engine.step() if e.token_id is not None]
            if events:
                steps.append(events)
        engine.shutdown()
        torch.save(steps, Path(out_dir) / "events.pt")
        torch.save(engine.scheduler.num_prefix_hit_tokens, Path(out_dir) / "hits.pt")
    else:
        follow_driver(runner)
    if recorded:
        torch.save(recorded, Path(out_dir) / f"logits{rank}.pt")
    dist.destroy_process_group()


def run_layout_schedule(model_dir: Path, tp: list[int], layers: list[int], depth: int, config: SchedulerConfig,
                        eos_token_ids: tuple[int, ...], arrivals: list[tuple[GenerationRequest, int, int | None]],
                        out_dir: Path) -> dict:
    """Drive a spawned replica of the given layout (`depth` micro-batches in flight, 0: one per stage) through
    `arrivals`: (request, the driver's step it is added before, abort once it has this many tokens or None) each.
    The driver's record: "steps", per Engine.step() its events as (request_id, token or None, finish reason,
    plain_logprobs); "idle", whether its scheduler ended with nothing running or waiting; its "preemptions" and
    "prefix_hits" (tokens)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn_ranks(_schedule_rank, sum(tp), (str(model_dir), tp, layers, depth, config, eos_token_ids, arrivals,
                                          str(out_dir)))
    return torch.load(out_dir / "schedule.pt")


def drive_arrivals(engine: Engine, arrivals: list[tuple[GenerationRequest, int, int | None]]) -> list[list[tuple]]:
    """Step the engine until every request has arrived and finished, adding each before its step and aborting it
    once it has its number of tokens (as test_engine_fuzz.drive does in one process); each step's events."""
    pending = sorted(arrivals, key=lambda a: a[1])
    produced = {request.request_id: 0 for request, _, _ in arrivals}
    finished: set[str] = set()
    steps: list[list[tuple]] = []
    while pending or engine.has_work:
        while pending and pending[0][1] <= len(steps):
            engine.add(pending.pop(0)[0])
        events = engine.step()
        steps.append([(e.request_id, e.token_id, e.finish_reason, plain_logprobs(e.logprobs)) for e in events])
        for e in events:
            produced[e.request_id] += e.token_id is not None
            if e.finish_reason is not None:
                finished.add(e.request_id)
        for request, _, abort_after in arrivals:
            rid = request.request_id
            if abort_after is not None and rid not in finished and produced[rid] >= abort_after:
                engine.abort(rid)
        assert len(steps) < 5000, "the engine does not finish"
    return steps


def _schedule_rank(rank: int, port: int, model_dir: str, tp: list[int], layers: list[int], depth: int,
                   config: SchedulerConfig, eos_token_ids: tuple[int, ...],
                   arrivals: list[tuple[GenerationRequest, int, int | None]], out_dir: str) -> None:
    source = resolve_model(model_dir, progress=False)
    plan = single_replica_plan(source.spec, tp, layers)
    layout = dataclasses.replace(layout_of(plan.replicas[0], "cpu"), depth=depth)
    spec = RankSpec(source, layout, rank, num_threads=1, master_port=port)
    ctx = init_rank(spec)
    runner = build_runner(spec, ctx, config)
    if ctx.is_driver:
        engine = Engine.create(runner, config, eos_token_ids)
        steps = drive_arrivals(engine, arrivals)
        engine.shutdown()
        scheduler = engine.scheduler
        torch.save({"steps": steps, "idle": not scheduler.running and not scheduler.waiting,
                    "preemptions": scheduler.num_preemptions, "prefix_hits": scheduler.num_prefix_hit_tokens},
                   Path(out_dir) / "schedule.pt")
    else:
        follow_driver(runner)
    dist.destroy_process_group()


# ---------------------------------------------------------------- the CLI as a user runs it

HEXGEN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hexgen"
TAG_VARIABLE = "HEXGEN_TEST_PROCESS_TAG"


def run_cli(args: list[str], timeout_s: float = 300) -> tuple[int, str, str, list[int]]:
    """Run `hexgen generate ARGS`; return (exit code, stdout, stderr, pids of processes it left alive).

    Every process the command starts inherits a unique environment tag, so leftovers are found by that
    tag even after they are re-parented."""
    import subprocess
    import sys
    import time
    import uuid

    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_VARIABLE: tag}
    command = [str(HEXGEN)] if HEXGEN.exists() else [sys.executable, "-m", "hexgen.cli"]
    # float32 as the references the tests compare with, unless given: not auto (bfloat16 on some CPUs)
    dtype = [] if any(a.startswith("--dtype") for a in args) else ["--dtype", "float32"]
    done = subprocess.run([*command, "generate", *args, *dtype], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    deadline = time.monotonic() + 5.0  # PR_SET_PDEATHSIG kills are asynchronous: give them a moment
    left = tagged_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = tagged_processes(tag)
    return done.returncode, done.stdout, done.stderr, left


def tagged_processes(tag: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TAG_VARIABLE) == tag:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def plan_messages_rank(rank: int, port: int, plans: list, out_path: str) -> None:
    """Rank 0 sends `plans` leader to leader as a stage does (pipeline.send_step); rank 1 takes them in through a
    PlanInbox and pickles what it got to `out_path`."""
    import pickle

    from hexgen.engine import pipeline
    from hexgen.engine.parallel import init_rank_context
    from hexgen.launch.spec import Layout

    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ctx = init_rank_context(Layout((1, 1), ((0, 1), (1, 2))), rank, "gloo")
    if rank == 0:
        outbox = pipeline.Outbox(2)
        for plan in plans:
            pipeline.send_step(ctx, outbox, plan, None)
        outbox.flush()
    else:
        inbox = pipeline.PlanInbox(ctx)
        Path(out_path).write_bytes(pickle.dumps([inbox.next_plan() for _ in plans]))
    dist.destroy_process_group()


def report_spin_count(spec, out_path: str) -> None:
    """A rank process's target: writes the GOMP_SPINCOUNT it started with (see test_rank_environment.py)."""
    Path(out_path).write_text(os.environ.get("GOMP_SPINCOUNT", "unset"))
