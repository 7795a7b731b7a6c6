"""LocalReplica: the worker processes of one replica on this machine, seen from the parent.

The parent submits requests to the driver rank and polls token events; if any rank reports an
error or exits, the whole replica is stopped and ReplicaFailed says why. close() always leaves no
process behind (shutdown, then terminate, then kill).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Sequence
from typing import Any

STOP_GRACE_S = 5.0


class ReplicaFailed(RuntimeError):
    """A rank of the replica failed or died; the message says which and why."""


class LocalReplica:
    def __init__(self, target: Callable[..., None], rank_args: Sequence[tuple[Any, ...]]):
        """`target(*rank_args[r], inbox, outbox)` runs in process r; rank 0 is the driver."""
        ctx = mp.get_context("spawn")
        self.inbox = ctx.Queue()
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(target=target, args=(*args, self.inbox if r == 0 else None, self.outbox),
                        name=f"hexgen-rank{r}", daemon=True)
            for r, args in enumerate(rank_args)
        ]
        self._pending: list[Any] = []
        self.closed = False

    @property
    def world_size(self) -> int:
        return len(self.procs)

    def start(self, on_loaded: Callable[[int], None] | None = None, timeout_s: float = 600.0) -> None:
        """Start every rank and wait until all hold their weights."""
        for proc in self.procs:
            proc.start()
        ready: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.world_size:
            if time.monotonic() > deadline:
                self.close()
                raise ReplicaFailed(f"ranks {sorted(set(range(self.world_size)) - ready)} not ready after {timeout_s:.0f} s")
            for message in self._receive(timeout_s=0.2):
                if message[0] == "loaded" and on_loaded is not None:
                    on_loaded(message[2])
                elif message[0] == "ready":
                    ready.add(message[1])
                else:
                    self._pending.append(message)

    def submit(self, request: Any) -> None:
        self.inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def poll(self, timeout_s: float = 0.1) -> list[Any]:
        """Messages from the driver ("events", [...]) / ("rejected", id, why); raises ReplicaFailed."""
        messages, self._pending = self._pending, []
        messages += self._receive(timeout_s)
        return messages

    def _receive(self, timeout_s: float) -> list[Any]:
        messages = []
        try:
            messages.append(self.outbox.get(timeout=timeout_s))
            while True:
                messages.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        for message in messages:
            if message[0] == "error":
                self.close()
                raise ReplicaFailed(f"rank {message[1]}: {message[2]}")
        if not messages:
            self._check_alive()
        return messages

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.exitcode is not None and not self.closed:
                self.close()
                raise ReplicaFailed(f"rank {rank} exited with code {proc.exitcode}")

    def close(self) -> None:
        """Ask the driver to stop every rank, then make sure each process is gone."""
        if self.closed:
            return
        self.closed = True
        if any(p.is_alive() for p in self.procs):
            self.inbox.put(("shutdown",))
        deadline = time.monotonic() + STOP_GRACE_S
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
        for q in (self.inbox, self.outbox):
            q.cancel_join_thread()
            q.close()
