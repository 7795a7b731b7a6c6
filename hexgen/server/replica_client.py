"""ReplicaClient: the coordinator's handle on one replica's processes (asyncio, no torch).

It routes the driver's token events to per-request queues, notices a dead or silent replica within
seconds, marks it down, stops its processes and tells every request it held (ReplicaDown), so the
coordinator can re-send or fail them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hexgen.dispatch import ReplicaState
from hexgen.engine.messages import GenerationRequest, TokenEvent
from hexgen.launch.channel import AsyncParentEnd, ChannelAddress, DriverGone
from hexgen.launch.entry import run_rank
from hexgen.launch.failure import RankFailure, settle_async
from hexgen.launch.local import STOP_GRACE_S, RankProcesses, StartupTracker
from hexgen.plan import Replica

WATCH_PERIOD_S = 0.5
SILENCE_LIMIT_S = 60.0  # no heartbeat or event for this long = hung (one step may be a long prefill)


class ReplicaStartError(RuntimeError):
    """A replica could not start; the message names the rank and its error."""


@dataclass(frozen=True)
class ReplicaDown:
    """Queued to every request of a replica that stopped; `reason` says why."""

    reason: str


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class ServerStopping:
    """Queued to every request still running when the server's drain time is up (Coordinator.end_requests)."""

    reason: str


class Ranks(Protocol):
    """The ranks of a replica wherever they run: local processes (RankProcesses) or Ray actors (RayRanks)."""

    def __len__(self) -> int: ...
    def start(self) -> None: ...
    def first_failure(self) -> str | None: ...
    def stop(self, grace_s: float = ...) -> None: ...
    def placement(self, rank: int) -> dict[str, Any]: ...


def local_ranks(rank_args: list[tuple[Any, ...]]) -> Callable[[ChannelAddress], Ranks]:
    """Ranks as processes of this machine; rank_args[r] = (RankSpec, SchedulerConfig, eos_token_ids)."""
    return lambda address: RankProcesses(run_rank, [(*args, address) for args in rank_args])


# What a driver's heartbeat says of the replica now, as opposed to its totals since it started (preemptions, prefix
# hits, drafts, step totals, the largest batch): a replica that is down runs nothing and holds no blocks.
LIVE_LOAD_KEYS = ("running", "waiting", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached")


class ReplicaClient:
    def __init__(self, index: int, plan: Replica, make_ranks: Callable[[ChannelAddress], Ranks],
                 capacity_weight: float = 1.0, channel_host: str = "127.0.0.1", secure: bool = False):
        """make_ranks(channel address) builds the replica's ranks; the channel binds on channel_host, encrypted
        with CurveZMQ when secure."""
        self.index = index
        self.plan = plan
        self.channel = AsyncParentEnd(channel_host, secure)
        self.processes = make_ranks(self.channel.address)
        self.state = ReplicaState(outstanding=0, is_up=False, capacity_weight=capacity_weight)
        self.status = "starting"
        self.down_reason: str | None = None
        self.load: dict[str, int] = {"running": 0, "waiting": 0}
        self._queues: dict[str, asyncio.Queue] = {}
        self._last_heard = time.monotonic()
        self._tasks: list[asyncio.Task] = []

    @property
    def world_size(self) -> int:
        return len(self.processes)

    async def start(self, on_loaded: Callable[[int], None] | None = None, timeout_s: float = 600.0) -> None:
        """Start the ranks and wait until every one holds its weights and the driver has sized its KV pool (its
        first heartbeat says how long a sequence the pool holds); raise ReplicaStartError on failure."""
        try:
            self.processes.start()  # returns at once: spawned processes, or actors Ray places in the background
        except Exception as err:  # noqa: BLE001 - e.g. Ray could not place an actor
            await self._stop_processes()
            raise ReplicaStartError(f"replica {self.index}: {type(err).__name__}: {err}".splitlines()[0]) from None
        tracker = StartupTracker(self.world_size, on_loaded)
        deadline = time.monotonic() + timeout_s
        while not (tracker.done and self.state.max_context is not None):
            try:
                message = await asyncio.wait_for(self.channel.receive(), timeout=WATCH_PERIOD_S)
            except TimeoutError:
                message = None
            if message is not None and message[0] == "error":
                failure = await settle_async([RankFailure.of(message)], self.channel.receive)
                await self._stop_processes()
                raise ReplicaStartError(f"replica {self.index} rank {failure.rank}: {failure.text}")
            if message is not None and not tracker.take(message) and message[0] == "heartbeat":
                self._take_heartbeat(message[1])
            failure = self.processes.first_failure()
            if failure is not None or time.monotonic() > deadline:
                await self._stop_processes()
                raise ReplicaStartError(f"replica {self.index}: {failure or f'not ready after {timeout_s} s'}")
        self.status, self.state.is_up = "up", True
        self._last_heard = time.monotonic()
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watch_loop())]

    def stage_status(self) -> list[dict[str, Any]]:
        """The plan's stages, each with where its ranks run (a pid here; a Ray node's id and address elsewhere)."""
        out, first = [], 0
        for stage in self.plan.stages:
            ranks = [self.processes.placement(r) for r in range(first, first + stage.tp)]
            out.append({**stage.to_dict(), "ranks": ranks})
            first += stage.tp
        return out

    async def submit(self, request: GenerationRequest) -> asyncio.Queue:
        """Queue of TokenEvent / Rejected / ReplicaDown / ServerStopping items for this request."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        self.state.outstanding += 1
        try:
            await self._send(("add", request))
        except BaseException:  # e.g. a request the channel cannot carry: it was never added, so forget it
            await self.release(request.request_id, abort=False)
            raise
        return queue

    async def release(self, request_id: str, abort: bool) -> None:
        """Forget a request; abort it on the replica if it may still be running."""
        if self._queues.pop(request_id, None) is not None:
            self.state.outstanding -= 1
            if abort and self.state.is_up:
                await self._send(("abort", request_id))

    async def _send(self, command: tuple) -> None:
        """A command to the driver; a driver that takes none is gone: the replica goes down and its requests hear
        so (ReplicaDown), this one's included."""
        try:
            await self.channel.send(command)
        except DriverGone as err:
            await self.mark_down(f"rank 0 failed: {err}")

    async def _receive_loop(self) -> None:
        while self.state.is_up:
            message = await self._next_error()
            # the rank that failed first, not a peer that lost it
            failure = await settle_async([RankFailure.of(message)], self._next_error)
            await self.mark_down(f"rank {failure.rank} failed: {failure.text}")

    async def _next_error(self) -> tuple:
        """The next error message of a rank; the messages before it are handled on the way (also while a failure
        settles: the driver's last tokens may arrive after a follower's report of losing a peer)."""
        while True:
            message = await self.channel.receive()
            self._last_heard = time.monotonic()
            kind = message[0]
            if kind == "error":
                return message
            if kind == "events":
                for event in message[1]:
                    self._deliver(event.request_id, event)
            elif kind == "rejected":
                self._deliver(message[1], Rejected(message[2]))
            elif kind == "heartbeat":
                self._take_heartbeat(message[1])

    def _take_heartbeat(self, stats: dict[str, Any]) -> None:
        self.load = dict(stats)
        self.state.max_context = stats["max_context"]  # the same in every heartbeat: set by the pool's size

    def interrupt(self, item: ServerStopping) -> None:
        """Hand `item` to every request this replica holds."""
        for queue in self._queues.values():
            queue.put_nowait(item)

    def _deliver(self, request_id: str, item: TokenEvent | Rejected) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    async def _watch_loop(self) -> None:
        while self.state.is_up:
            await asyncio.sleep(WATCH_PERIOD_S)
            failure = self.processes.first_failure()
            if failure is not None:
                await self.mark_down(failure)
            elif time.monotonic() - self._last_heard > SILENCE_LIMIT_S:
                await self.mark_down(f"no heartbeat for {SILENCE_LIMIT_S:.0f} s")

    async def mark_down(self, reason: str) -> None:
        """Stop serving from this replica: fail over its requests and stop its processes (unless close() is
        stopping them already: its requests still hear it)."""
        if self.status == "down":
            return
        closing = self.status == "stopped"
        self.status, self.state.is_up, self.down_reason = "down", False, reason
        self._cancel_tasks()
        self.load = {**self.load, **dict.fromkeys(LIVE_LOAD_KEYS, 0)}  # its last heartbeat is no longer true
        queues, self._queues = self._queues, {}
        self.state.outstanding = 0
        for queue in queues.values():
            queue.put_nowait(ReplicaDown(reason))
        if not closing:
            await self._stop_processes()

    async def _stop_processes(self) -> None:
        try:
            await asyncio.to_thread(self.processes.stop, 0.0)
        finally:  # also when the task stopping them is cancelled: its sockets and ports are not left open
            self.channel.close()

    def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        """Shut the replica down cleanly (used when the server stops)."""
        self._cancel_tasks()
        if self.status == "up":
            self.status, self.state.is_up = "stopped", False
            try:
                await self.channel.send(("shutdown",))
                grace_s = STOP_GRACE_S
            except DriverGone:  # it ended already: stop the rest at once
                grace_s = 0.0
            try:
                await asyncio.to_thread(self.processes.stop, grace_s)
            finally:
                self.channel.close()
