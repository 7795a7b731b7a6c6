"""Entry point of one worker process: become a rank, load the shard, then drive or follow.

Every rank reports ("loaded", rank, layers), ("ready", rank) or ("error", rank, text, cause) on the events
channel (see hexgen/launch/channel.py); the driver then serves commands and sends token events.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch.distributed as dist

from hexgen.engine.engine import Engine, build_runner, follow_driver, init_rank
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import UserError
from hexgen.launch.channel import ChannelAddress, RankEnd
from hexgen.launch.failure import RankFailure, classify
from hexgen.launch.lifetime import die_with_parent
from hexgen.launch.spec import RankSpec

IDLE_POLL_S = 0.05
HEARTBEAT_S = 1.0


def rank_main(
    spec: RankSpec, scheduler_config: SchedulerConfig, eos_token_ids: tuple[int, ...], address: ChannelAddress
) -> None:
    die_with_parent()
    channel = RankEnd(address, receives_commands=spec.rank == 0)
    try:
        ctx = init_rank(spec)
        runner = build_runner(spec, ctx, scheduler_config, progress=lambda n: channel.put(("loaded", spec.rank, n)))
        channel.put(("ready", spec.rank))
        if ctx.is_driver:
            serve_driver(Engine.create(runner, scheduler_config, eos_token_ids), channel)
        else:
            follow_driver(runner)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which stops every rank
        # One line to the parent, with what kind of failure it was: a peer's death shows up on every other rank
        # as a gloo error, and the parent names the rank that failed first (launch/failure.py). HEXGEN_DEBUG=1
        # also prints the rank's traceback.
        is_input = isinstance(err, UserError)
        if os.environ.get("HEXGEN_DEBUG") and not is_input:
            traceback.print_exc()
        text = str(err) if is_input else f"{type(err).__name__}: {err}".splitlines()[0]
        channel.put(RankFailure(spec.rank, text, classify(err, is_input)).message())
        sys.exit(2 if is_input else 1)
    finally:
        channel.close()  # a failing rank's error leaves before its peers can see it go (the process group ends next)
        if dist.is_initialized():
            dist.destroy_process_group()


def serve_driver(engine: Engine, channel: RankEnd) -> None:
    """Apply commands between steps; step while there is work; heartbeat while idle or busy, and at once when the
    number of running or waiting sequences changed or the replica has just run out of work (so /status and /metrics
    never lag a finished request by a heartbeat period)."""
    last_beat, last_load, last_steps = 0.0, (0, 0), 0
    while True:
        for command in channel.get_all(0.0 if engine.has_work else IDLE_POLL_S):
            if command[0] == "add":
                try:
                    engine.add(command[1])
                except ValueError as err:
                    channel.put(("rejected", command[1].request_id, str(err)))
            elif command[0] == "abort":
                engine.abort(command[1])
            elif command[0] == "shutdown":
                engine.shutdown()
                return
        if engine.has_work:
            events = engine.step()
            if events:
                channel.put(("events", events))
        else:
            engine.keep_alive()
        now = time.monotonic()
        scheduler = engine.scheduler
        load = (len(scheduler.running), len(scheduler.waiting))
        went_idle = not engine.has_work and engine.totals.steps != last_steps
        if now - last_beat >= HEARTBEAT_S or load != last_load or went_idle:
            stats = {"running": load[0], "waiting": load[1], "max_context": scheduler.max_context,
                     "peak_running": scheduler.peak_running, "kv_blocks_used": scheduler.blocks.num_used,
                     "kv_blocks_free": scheduler.blocks.num_free, "kv_blocks_cached": scheduler.blocks.num_cached,
                     "prefix_hit_tokens": scheduler.num_prefix_hit_tokens, "preemptions": scheduler.num_preemptions,
                     "draft_tokens": scheduler.num_drafted, "accepted_draft_tokens": scheduler.num_accepted,
                     **engine.totals.as_stats()}
            channel.put(("heartbeat", stats))
            last_beat, last_load, last_steps = now, load, engine.totals.steps
