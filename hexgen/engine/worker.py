"""Entry point of one worker process: become a rank, load the shard, then drive or follow.

Messages to the parent go through `outbox` as tuples:
  ("loaded", rank, layers)   progress of weight loading
  ("ready", rank)            the rank holds its weights
  ("events", [TokenEvent])   tokens produced by a step (driver only)
  ("error", rank, message)   the rank failed; the parent stops the replica
The driver reads ("add", GenerationRequest) / ("abort", request_id) / ("shutdown",) from `inbox`.
"""

from __future__ import annotations

import queue
import sys
import traceback

import torch.distributed as dist

from hexgen.engine.engine import Engine, RankSpec, build_runner, follow_driver, init_rank
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import UserError
from hexgen.launch.lifetime import die_with_parent

IDLE_POLL_S = 0.05


def rank_main(spec: RankSpec, scheduler_config: SchedulerConfig, eos_token_ids: tuple[int, ...],
              inbox, outbox) -> None:
    die_with_parent()
    try:
        ctx = init_rank(spec)
        runner = build_runner(spec, ctx, progress=lambda n: outbox.put(("loaded", spec.rank, n)))
        outbox.put(("ready", spec.rank))
        if ctx.is_driver:
            serve_driver(Engine.create(runner, scheduler_config, eos_token_ids), inbox, outbox)
        else:
            follow_driver(runner)
    except UserError as err:
        outbox.put(("error", spec.rank, str(err)))
        sys.exit(2)
    except Exception:  # noqa: BLE001 - reported to the parent, which stops every rank
        outbox.put(("error", spec.rank, traceback.format_exc(limit=6)))
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def serve_driver(engine: Engine, inbox, outbox) -> None:
    """Apply commands between steps; step while there is work; block briefly when idle."""
    while True:
        for command in _drain(inbox, block=not engine.has_work):
            if command[0] == "add":
                try:
                    engine.add(command[1])
                except ValueError as err:
                    outbox.put(("rejected", command[1].request_id, str(err)))
            elif command[0] == "abort":
                engine.abort(command[1])
            elif command[0] == "shutdown":
                engine.shutdown()
                return
        if engine.has_work:
            events = engine.step()
            if events:
                outbox.put(("events", events))


def _drain(inbox, block: bool) -> list[tuple]:
    commands = []
    try:
        commands.append(inbox.get(timeout=IDLE_POLL_S) if block else inbox.get_nowait())
        while True:
            commands.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return commands
