"""The worker processes of one replica on this machine, seen from the parent.

`RankProcesses` starts, watches and stops the processes; `LocalReplica` adds the blocking message
channel used by `hexgen generate` and benchmarks. If any rank reports an error or exits, the whole
replica is stopped and ReplicaFailed says why; close() always leaves no process behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hexgen.launch.channel import DriverGone, ParentEnd
from hexgen.launch.entry import rank_environment
from hexgen.launch.failure import Cause, RankFailure, settle

STOP_GRACE_S = 5.0
EXIT_DRAIN_S = 0.2  # once a rank has exited, how long to wait for the error it sent before exiting


_ENVIRONMENT_LOCK = threading.Lock()  # one child started with extra variables at a time (a server starts replicas)


@contextlib.contextmanager
def extra_environment(variables: dict[str, str]) -> Iterator[None]:
    """os.environ with `variables` added for the duration (for a child process started inside), then as before."""
    with _ENVIRONMENT_LOCK:
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class ReplicaFailed(RuntimeError):
    """A rank of the replica failed or died; the message says which and why."""


class RankProcesses:
    def __init__(self, target: Callable[..., None], rank_args: Sequence[tuple[Any, ...]]):
        """`target(*rank_args[r])` runs in process r (spawned, so nothing is inherited by accident); each rank_args[r]
        starts with that rank's RankSpec, whose process starts with entry.rank_environment's variables set."""
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=target, args=args, name=f"hexgen-rank{r}", daemon=True)
            for r, args in enumerate(rank_args)
        ]
        self.environments = [rank_environment(args[0]) for args in rank_args]

    def __len__(self) -> int:
        return len(self.procs)

    def start(self) -> None:
        for proc, environment in zip(self.procs, self.environments, strict=True):
            with extra_environment(environment):  # a spawned process starts with the parent's os.environ
                proc.start()

    def first_exited(self) -> tuple[int, int] | None:
        """(rank, exit code) of a rank that has ended, if any."""
        for rank, proc in enumerate(self.procs):
            if proc.exitcode is not None:
                return rank, proc.exitcode
        return None

    def first_failure(self) -> str | None:
        """Why a rank has ended, if one has."""
        exited = self.first_exited()
        return None if exited is None else f"rank {exited[0]} exited with code {exited[1]}"

    def placement(self, rank: int) -> dict[str, int | None]:
        return {"pid": self.procs[rank].pid}

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Wait up to grace_s for a clean exit, then terminate, then kill."""
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            if proc.pid is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


class StartupTracker:
    """Follows ("loaded", rank, n) / ("ready", rank) messages until every rank holds its weights."""

    def __init__(self, world_size: int, on_loaded: Callable[[int], None] | None):
        self.world_size = world_size
        self.on_loaded = on_loaded
        self.ready: set[int] = set()

    @property
    def done(self) -> bool:
        return len(self.ready) == self.world_size

    def take(self, message: tuple) -> bool:
        """True if the message was about start-up (and is consumed)."""
        if message[0] == "loaded":
            if self.on_loaded is not None:
                self.on_loaded(message[2])
            return True
        if message[0] == "ready":
            self.ready.add(message[1])
            return True
        return False


class LocalReplica:
    def __init__(self, target: Callable[..., None], rank_args: Sequence[tuple[Any, ...]]):
        """`target(*rank_args[r], channel_address)` runs in process r; rank 0 is the driver."""
        self.channel = ParentEnd()
        self.processes = RankProcesses(target, [(*args, self.channel.address) for args in rank_args])
        self._pending: list[Any] = []
        self.closed = False

    @property
    def world_size(self) -> int:
        return len(self.processes)

    def start(self, on_loaded: Callable[[int], None] | None = None, timeout_s: float = 600.0) -> None:
        """Start every rank and wait until all hold their weights."""
        self.processes.start()
        tracker = StartupTracker(self.world_size, on_loaded)
        deadline = time.monotonic() + timeout_s
        while not tracker.done:
            if time.monotonic() > deadline:
                self.close()
                raise ReplicaFailed(
                    f"ranks {sorted(set(range(self.world_size)) - tracker.ready)} not ready after {timeout_s:.0f} s"
                )
            self._pending += [m for m in self._receive(0.2) if not tracker.take(m)]

    def submit(self, request: Any) -> None:
        self._send(("add", request))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        try:
            self.channel.send(command)
        except DriverGone as err:  # its process has ended: say why, as a poll would
            self._receive(EXIT_DRAIN_S)
            self.close()
            raise ReplicaFailed(f"rank 0: {err}") from None

    def poll(self, timeout_s: float = 0.1) -> list[Any]:
        """Messages from the driver ("events", [...]) / ("rejected", id, why); raises ReplicaFailed."""
        messages, self._pending = self._pending, []
        return messages + [m for m in self._receive(timeout_s) if m[0] != "heartbeat"]

    def _receive(self, timeout_s: float) -> list[Any]:
        messages = self.channel.receive(timeout_s)
        exited = self.processes.first_exited() if not messages else None
        if exited is not None:  # a failing rank sends its error before it exits: take it if it is on its way
            messages = self.channel.receive(EXIT_DRAIN_S)
        why = self._failure(messages, exited)
        if why is not None:
            self.close()
            raise ReplicaFailed(why)
        return messages

    def _failure(self, messages: list[Any], exited: tuple[int, int] | None) -> str | None:
        """Why the replica failed, if it did: the rank that failed first, not a peer that lost it."""
        failures = [RankFailure.of(m) for m in messages if m[0] == "error"]
        if not failures:
            return None if exited is None else f"rank {exited[0]} exited with code {exited[1]}"
        failure = settle(failures, self.channel.receive)
        if failure.cause is Cause.PEER:  # each rank that spoke only lost a peer: one that exited silently (a signal)
            reported = {f.rank for f in failures}
            for rank, proc in enumerate(self.processes.procs):
                if proc.exitcode is not None and rank not in reported:
                    return f"rank {rank} exited with code {proc.exitcode}"
        return f"rank {failure.rank}: {failure.text}"

    def close(self) -> None:
        """Ask the driver to stop every rank, then make sure each process is gone."""
        if self.closed:
            return
        self.closed = True
        grace_s = 0.0
        if all(p.is_alive() for p in self.processes.procs):
            with contextlib.suppress(DriverGone):  # it ended since: stop the rest at once
                self.channel.send(("shutdown",))
                grace_s = STOP_GRACE_S
        self.processes.stop(grace_s)
        self.channel.close()
