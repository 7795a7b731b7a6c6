"""Open one replica on this machine: in this process when it is one rank, else as worker processes.

Both kinds answer the same calls: start(on_loaded), submit(request), abort(id), poll(timeout), close().
"""

from __future__ import annotations

import time

from hexgen.engine.checkpoint import ModelSource
from hexgen.engine.engine import Engine, build_runner, init_rank
from hexgen.engine.messages import GenerationRequest
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.launch.entry import run_rank
from hexgen.launch.local import LocalReplica
from hexgen.launch.spec import RankSpec, rank_specs
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
        runner = build_runner(self.spec, init_rank(self.spec), self.scheduler_config, on_loaded)
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


def open_local_replica(
    source: ModelSource,
    replica: Replica,
    dtype: str,
    device: str,
    scheduler_config: SchedulerConfig,
    eos_token_ids: tuple[int, ...],
    threads_per_rank: int | None = None,
):
    """The replica's ranks on this machine; CPU threads per rank as `rank_specs` sets them unless given."""
    specs = rank_specs(source, replica, dtype, device, threads_per_rank)
    if len(specs) == 1:
        return InProcessReplica(specs[0], scheduler_config, eos_token_ids)
    return LocalReplica(run_rank, [(spec, scheduler_config, eos_token_ids) for spec in specs])
