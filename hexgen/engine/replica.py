"""Open one replica on this machine: in this process when it is one rank, else as worker processes.

Both kinds answer the same calls: start(on_loaded), submit(request), abort(id), poll(timeout), close().
"""

from __future__ import annotations

import os
import time

from hexgen.engine.checkpoint import ModelSource
from hexgen.engine.engine import Engine, RankSpec, build_runner, init_rank, layout_of
from hexgen.engine.messages import GenerationRequest
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.engine.worker import rank_main
from hexgen.launch.lifetime import free_port
from hexgen.launch.local import LocalReplica
from hexgen.plan import Replica


class InProcessReplica:
    def __init__(self, spec: RankSpec, scheduler_config: SchedulerConfig, eos_token_ids: tuple[int, ...]):
        self.spec = spec
        self.scheduler_config = scheduler_config
        self.eos_token_ids = eos_token_ids
        self.engine: Engine | None = None
        self._pending: list[tuple] = []

    @property
    def world_size(self) -> int:
        return 1

    def start(self, on_loaded=None) -> None:
        runner = build_runner(self.spec, init_rank(self.spec), on_loaded)
        self.engine = Engine.create(runner, self.scheduler_config, self.eos_token_ids)

    def submit(self, request: GenerationRequest) -> None:
        assert self.engine is not None
        try:
            self.engine.add(request)
        except ValueError as err:
            self._pending.append(("rejected", request.request_id, str(err)))

    def abort(self, request_id: str) -> None:
        assert self.engine is not None
        self.engine.abort(request_id)

    def poll(self, timeout_s: float = 0.1) -> list[tuple]:
        assert self.engine is not None
        messages, self._pending = self._pending, []
        if self.engine.has_work:
            events = self.engine.step()
            if events:
                messages.append(("events", events))
        elif not messages:
            time.sleep(min(timeout_s, 0.01))
        return messages

    def close(self) -> None:
        self.engine = None


def rank_specs(source: ModelSource, replica: Replica, dtype: str, device: str) -> list[RankSpec]:
    layout = layout_of(replica)
    world = layout.world_size
    threads = 0 if world == 1 else max(1, (os.cpu_count() or 1) // world)
    port = free_port() if world > 1 else 0
    specs = []
    for stage in replica.stages:
        for gpu in stage.gpus:
            specs.append(RankSpec(source, layout, len(specs), dtype, device, gpu, threads, port))
    return specs


def open_local_replica(source: ModelSource, replica: Replica, dtype: str, device: str,
                       scheduler_config: SchedulerConfig, eos_token_ids: tuple[int, ...]):
    specs = rank_specs(source, replica, dtype, device)
    if len(specs) == 1:
        return InProcessReplica(specs[0], scheduler_config, eos_token_ids)
    return LocalReplica(rank_main, [(spec, scheduler_config, eos_token_ids) for spec in specs])
