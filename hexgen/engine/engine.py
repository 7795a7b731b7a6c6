"""Build a rank of a replica and drive it: Engine.step() = fill the pipeline -> take the oldest step back.

A replica of S stages keeps up to S micro-batches (disjoint sets of sequences) in flight: while stage s+1
runs one, stage s runs the next, so a pipeline's throughput follows its slowest stage. Stages that share a
machine's CPU cores take turns instead (Layout.depth, set by launch/spec.py:pipeline_depth).

A one-rank replica on CUDA overlaps its steps instead (SchedulerConfig.overlap_steps): while the GPU computes
step N, the driver queues step N+1, whose decodes feed back step N's sampled tokens on the device (the scheduler's
look-ahead), and only then waits for step N's tokens; so the host's work between two steps (the scheduler, the
plan's metadata, launching) runs while the GPU works instead of leaving it idle. A sequence that step N finishes
has computed one token in vain, and a request that arrives while step N runs joins step N+2 (N+1 is already
queued): one step later than in series.

Between steps the other ranks wait for the next plan in gloo receives and broadcasts, which fail once they have
waited dist_timeout_s(); an idle driver therefore sends an empty keep-alive plan down the pipeline every
keepalive_interval_s() (Engine.keep_alive), so an idle replica stays up however long it idles, while a rank that
really hangs is still found.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from hexgen.engine import pipeline
from hexgen.engine.cpu_heap import keep_freed_memory
from hexgen.engine.kv_budget import CPU_DEFAULT_KV_BYTES, CUDA_MARGIN_FRACTION, blocks_wanted
from hexgen.engine.messages import GenerationRequest, StepPlan, StepSamples, TokenEvent
from hexgen.engine.parallel import RankContext, init_rank_context, single_process_context
from hexgen.engine.runner import StageRunner
from hexgen.engine.sampler import unpack_samples
from hexgen.engine.scheduler import Scheduler, SchedulerConfig
from hexgen.engine.stage import LlamaStage
from hexgen.engine.turns import release_worker_threads
from hexgen.engine.weights import CheckpointReader
from hexgen.errors import UserError
from hexgen.launch.spec import RankSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DIST_TIMEOUT_S = 1800.0  # torch's own default for gloo; HEXGEN_DIST_TIMEOUT_S overrides it (seconds)
KEEPALIVE_MAX_S = 60.0


def dist_timeout_s() -> float:
    """How long a rank may wait in a gloo operation before it fails: HEXGEN_DIST_TIMEOUT_S, else DIST_TIMEOUT_S."""
    text = os.environ.get("HEXGEN_DIST_TIMEOUT_S")
    if text is None:
        return DIST_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UserError(f"HEXGEN_DIST_TIMEOUT_S={text!r}: must be a number of seconds above 0")
    return value


def keepalive_interval_s() -> float:
    """How often an idle driver sends a keep-alive plan: well inside the timeout its peers wait with."""
    return min(KEEPALIVE_MAX_S, dist_timeout_s() / 4)


def init_rank(spec: RankSpec) -> RankContext:
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    if spec.device == "cuda":  # Triton launches, graph capture and events use the current device: make it ours
        torch.cuda.set_device(spec.gpu_index)
    if spec.layout.world_size == 1:
        return single_process_context(spec.layout)
    backend = "nccl" if spec.device == "cuda" else "gloo"
    os.environ["MASTER_ADDR"] = spec.master_addr  # not one inherited from a job around us (torchrun, SLURM)
    os.environ["MASTER_PORT"] = str(spec.master_port)
    dist.init_process_group(backend, rank=spec.rank, world_size=spec.layout.world_size)
    return init_rank_context(spec.layout, spec.rank, backend, timedelta(seconds=dist_timeout_s()))


def build_runner(spec: RankSpec, ctx: RankContext, config: SchedulerConfig, progress=None) -> StageRunner:
    """Allocate this rank's shard of the model, load its weights, and size and allocate its KV pool."""
    device = torch.device("cuda", spec.gpu_index) if spec.device == "cuda" else torch.device("cpu")
    stage = LlamaStage(spec.source.spec, ctx, DTYPES[spec.dtype], device)
    stage.load(CheckpointReader(spec.source.directory, DTYPES[spec.dtype]), progress)
    stage.pack_weights()
    runner = StageRunner(ctx, stage, device)
    runner.allocate_kv_pool(agree_num_blocks(ctx, stage, config), config.block_size)
    if device.type == "cpu":
        keep_freed_memory()  # the steps' tensors from here on reuse heap pages (engine/cpu_heap.py)
    tuning = runner.tune_attention()
    if tuning is not None and device.type == "cuda":
        print(f"hexgen: rank {spec.rank} on {torch.cuda.get_device_name(device)}: {tuning.summary()}", file=sys.stderr)
    if not config.enforce_eager:
        runner.capture_decode_graphs(config.max_running_seqs, config.max_context)
    if spec.end_turns and device.type == "cpu":
        runner.end_turn = release_worker_threads
    return runner


def agree_num_blocks(ctx: RankContext, stage: LlamaStage, config: SchedulerConfig) -> int:
    """Blocks every rank of the replica can hold (the tightest rank decides; block ids are shared)."""
    blocks = config.num_kv_blocks or local_num_blocks(stage, config, ctx.layout.world_size)
    if ctx.control is not None:
        agreed = torch.tensor([blocks], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=ctx.control)
        blocks = int(agreed)
    if blocks < config.max_running_seqs:
        raise UserError(
            f"the KV cache holds {blocks} blocks of {config.block_size} tokens, fewer than one per sequence of "
            f"--max-batch {config.max_running_seqs}: raise --memory-gb or lower --max-batch"
        )
    return blocks


def local_num_blocks(stage: LlamaStage, config: SchedulerConfig, ranks_here: int) -> int:
    """Blocks this rank's memory budget holds once its weights are loaded, capped at what could be used."""
    per_block = stage.kv_bytes_per_block(config.block_size)
    if config.memory_bytes is not None:
        kv_bytes = config.memory_bytes - stage.weight_bytes()
    elif stage.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(stage.device)
        kv_bytes = free - int(CUDA_MARGIN_FRACTION * total)
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        kv_bytes = min(CPU_DEFAULT_KV_BYTES, available // (4 * ranks_here))
    wanted = blocks_wanted(config.max_running_seqs, config.max_context, config.block_size)
    return max(0, min(wanted, kv_bytes // per_block))


@dataclass
class StepTotals:
    """What a driver's steps have done since it started (reported in its heartbeats; /status, /metrics and `hexgen
    bench serve` turn differences of two reports into mean step time, batch size and how busy the driver was). With
    several micro-batches in flight (a pipeline on separate devices), busy seconds over steps is the time between two
    micro-batches finishing, which is what sets the replica's throughput."""

    steps: int = 0  # micro-batches finished
    step_tokens: int = 0  # tokens they computed: prompt chunks and decodes
    sampled_tokens: int = 0  # tokens they sampled (one per sequence that reached its prompt's end)
    busy_s: float = 0.0  # wall seconds inside Engine.step with work to do: launching, waiting for, finishing steps

    def as_stats(self) -> dict[str, float]:
        return {"engine_steps": self.steps, "engine_step_tokens": self.step_tokens,
                "engine_sampled_tokens": self.sampled_tokens, "engine_busy_s": round(self.busy_s, 6)}


class Engine:
    """The driver (rank 0) of a replica: owns the scheduler and feeds micro-batches into the pipeline."""

    def __init__(self, runner: StageRunner, scheduler: Scheduler):
        assert runner.ctx.is_driver
        self.runner = runner
        self.scheduler = scheduler
        self.num_stages = runner.ctx.layout.num_stages
        self.micro_batches = runner.ctx.layout.micro_batches  # disjoint micro-batches the pipeline keeps in flight
        self.in_flight: deque[tuple[StepPlan, Callable[[], StepSamples]]] = deque()
        self.set_overlap(overlaps_steps(runner, scheduler.config))  # sets overlap and depth (steps kept in flight)
        self.outbox = pipeline.Outbox(self.micro_batches)
        self.totals = StepTotals()
        self.keepalive_s = keepalive_interval_s()
        self._last_plan_s = time.monotonic()  # when the other ranks last got a plan

    @classmethod
    def create(cls, runner: StageRunner, config: SchedulerConfig, eos_token_ids: tuple[int, ...]) -> Engine:
        blocks = runner.stage.kv_pool.shape[1]
        return cls(runner, Scheduler(replace(config, num_kv_blocks=blocks), eos_token_ids))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.in_flight)

    def add(self, request: GenerationRequest) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def step(self) -> list[TokenEvent]:
        """Launch micro-batches until `depth` are in flight, then finish the oldest; its events."""
        started = time.perf_counter()
        while len(self.in_flight) < self.depth:
            plan = self.scheduler.schedule(self.scheduler.micro_batch_limit(self.micro_batches),
                                           lookahead=self.overlap and bool(self.in_flight))
            if plan is None:
                break
            self.in_flight.append((plan, self._launch(plan)))
        if not self.in_flight:
            return self.scheduler.update(StepPlan(), [])
        plan, samples_of = self.in_flight.popleft()
        samples = samples_of()
        events = self.scheduler.update(plan, samples.token_ids, samples.logprobs, samples.prompt_logprobs)
        totals = self.totals
        totals.steps += 1
        totals.step_tokens += plan.num_tokens
        totals.sampled_tokens += sum(plan.sample)  # a sequence verifying drafts counts once
        totals.busy_s += time.perf_counter() - started
        return events

    def set_overlap(self, on: bool) -> None:
        """Overlap steps or not from now on (a one-rank replica only; between requests: benchmarks compare both)."""
        assert not self.has_work, "set_overlap while steps are in flight"
        self.overlap = on and self.runner.ctx.layout.world_size == 1  # look-ahead steps overlap the one before
        self.depth = 2 if self.overlap else self.micro_batches  # steps kept in flight

    def keep_alive(self) -> None:
        """While idle, send the other ranks an empty plan once keepalive_s has passed since their last one (see
        the module's docstring); a no-op for a one-rank replica."""
        ctx = self.runner.ctx
        if ctx.layout.world_size == 1 or self.has_work or time.monotonic() - self._last_plan_s < self.keepalive_s:
            return
        plan = pipeline.share_plan_in_stage(ctx, StepPlan(keepalive=True))
        if self.num_stages > 1:
            pipeline.send_step(ctx, self.outbox, plan, None)
        self._last_plan_s = time.monotonic()

    def _launch(self, plan: StepPlan) -> Callable[[], StepSamples]:
        ctx = self.runner.ctx
        self._last_plan_s = time.monotonic()
        plan = pipeline.share_plan_in_stage(ctx, plan)
        hidden, last_rows = self.runner.forward(plan, None)
        if ctx.layout.world_size == 1:
            return self.runner.sample_later(plan, hidden, last_rows)
        if ctx.is_last_stage:
            table = self.runner.sample(plan, hidden, last_rows)
            assert table is not None
            samples = unpack_samples(table, plan)
            return lambda: samples
        pipeline.send_step(ctx, self.outbox, plan, hidden)
        self.runner.end_turn()  # the next stage's turn: no thread of this rank keeps a core from it
        return pipeline.receive_samples(ctx, plan)

    def shutdown(self) -> None:
        """Finish what is in flight, then tell the other ranks to leave their loop."""
        while self.in_flight:
            plan, samples_of = self.in_flight.popleft()
            samples = samples_of()
            self.scheduler.update(plan, samples.token_ids, samples.logprobs, samples.prompt_logprobs)
        plan = pipeline.share_plan_in_stage(self.runner.ctx, StepPlan(shutdown=True))
        if self.num_stages > 1:
            pipeline.send_step(self.runner.ctx, self.outbox, plan, None)
        self.outbox.flush()


def overlaps_steps(runner: StageRunner, config: SchedulerConfig) -> bool:
    """Whether the driver overlaps its steps: only a one-rank replica can (its device holds the sampled tokens the
    next step feeds back); by default only on CUDA, where the host's work between steps would idle the GPU (on a
    CPU the same cores do both, and a finished sequence's look-ahead token would be work thrown away). Never with
    speculative decoding: a sequence always looked ahead would never have a step of its own to draft in."""
    if runner.ctx.layout.world_size != 1 or config.speculative_tokens:
        return False
    return runner.device.type == "cuda" if config.overlap_steps is None else config.overlap_steps


def follow_driver(runner: StageRunner) -> None:
    """Loop of every rank but the driver: run each micro-batch as it arrives, pass it on, until shutdown."""
    ctx, stage = runner.ctx, runner.stage
    outbox = pipeline.Outbox(ctx.layout.micro_batches)
    inbox = pipeline.PlanInbox(ctx) if ctx.is_leader and not ctx.is_first_stage else None
    while True:
        plan, hidden = pipeline.receive_step(ctx, inbox, stage.spec.hidden_size, runner.dtype, runner.device)
        if plan.shutdown or plan.keepalive:
            if not ctx.is_last_stage:
                pipeline.send_step(ctx, outbox, plan, None)
            if plan.keepalive:
                continue
            outbox.flush()
            return
        hidden, last_rows = runner.forward(plan, hidden)
        if not ctx.is_last_stage:
            pipeline.send_step(ctx, outbox, plan, hidden)
        else:
            table = runner.sample(plan, hidden, last_rows)
            if table is not None and plan.returns_samples:
                pipeline.send_samples(ctx, outbox, table)
        runner.end_turn()
