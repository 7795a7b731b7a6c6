"""Build a rank of a replica and drive it: Engine.step() = schedule -> execute on every rank -> update."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hexgen.engine import pipeline
from hexgen.engine.messages import GenerationRequest, StepPlan, TokenEvent
from hexgen.engine.parallel import RankContext, init_rank_context, single_process_context
from hexgen.engine.runner import StageRunner
from hexgen.engine.scheduler import Scheduler, SchedulerConfig
from hexgen.engine.stage import LlamaStage
from hexgen.engine.weights import CheckpointReader
from hexgen.launch.spec import RankSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_rank(spec: RankSpec) -> RankContext:
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    if spec.layout.world_size == 1:
        return single_process_context(spec.layout)
    backend = "nccl" if spec.device == "cuda" else "gloo"
    if spec.device == "cuda":
        torch.cuda.set_device(spec.gpu_index)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(spec.master_port)
    dist.init_process_group(backend, rank=spec.rank, world_size=spec.layout.world_size)
    return init_rank_context(spec.layout, spec.rank, backend)


def build_runner(spec: RankSpec, ctx: RankContext, progress=None) -> StageRunner:
    """Allocate this rank's shard of the model and load its weights from the checkpoint."""
    device = torch.device("cuda", spec.gpu_index) if spec.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[spec.dtype]
    stage = LlamaStage(spec.source.spec, ctx, dtype, device)
    stage.load(CheckpointReader(spec.source.directory, dtype), progress)
    return StageRunner(ctx, stage, device)


class Engine:
    """The driver (rank 0) of a replica: owns the scheduler and starts every step on every rank."""

    def __init__(self, runner: StageRunner, scheduler: Scheduler):
        assert runner.ctx.is_driver
        self.runner = runner
        self.scheduler = scheduler

    @classmethod
    def create(cls, runner: StageRunner, config: SchedulerConfig, eos_token_ids: tuple[int, ...]) -> Engine:
        return cls(runner, Scheduler(config, eos_token_ids))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, request: GenerationRequest) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        if plan is None:
            return self.scheduler.update(StepPlan(), [])
        plan = pipeline.broadcast_plan(self.runner.ctx, plan)
        sampled = self.runner.execute(plan)
        return self.scheduler.update(plan, sampled)

    def shutdown(self) -> None:
        """Tell the other ranks to leave their loop."""
        pipeline.broadcast_plan(self.runner.ctx, StepPlan(shutdown=True))


def follow_driver(runner: StageRunner) -> None:
    """Loop of every rank except the driver: run each plan the driver broadcasts until shutdown."""
    while True:
        plan = pipeline.broadcast_plan(runner.ctx, None)
        if plan.shutdown:
            return
        runner.execute(plan)
