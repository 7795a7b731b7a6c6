"""Pickled messages between a parent (CLI or coordinator) and a replica's ranks over ZeroMQ.

Two sockets per replica, both bound by the parent on loopback ports it picks:
  commands  parent PUSH -> driver PULL     ("add", request) / ("abort", id) / ("shutdown",)
  events    every rank PUSH -> parent PULL  ("loaded", rank, n) / ("ready", rank) / ("error", rank, text)
                                            / ("events", [TokenEvent]) / ("rejected", id, text) / ("heartbeat", stats)
Over TCP, so a replica on another machine can use the same code with the parent's address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

LINGER_MS = 1000  # let a dying rank's last message (its error) leave before the socket closes


@dataclass(frozen=True)
class ChannelAddress:
    commands: str
    events: str


class RankEnd:
    """The rank side: every rank sends events; the driver also receives commands."""

    def __init__(self, address: ChannelAddress, receives_commands: bool):
        self._ctx = zmq.Context()
        self._events = self._ctx.socket(zmq.PUSH)
        self._events.setsockopt(zmq.LINGER, LINGER_MS)
        self._events.connect(address.events)
        self._commands = None
        if receives_commands:
            self._commands = self._ctx.socket(zmq.PULL)
            self._commands.connect(address.commands)

    def put(self, message: Any) -> None:
        self._events.send_pyobj(message)

    def get_all(self, timeout_s: float) -> list[Any]:
        """Every waiting command; waits up to timeout_s for the first (0 = do not wait)."""
        assert self._commands is not None
        return _drain(self._commands, timeout_s)

    def close(self) -> None:
        self._ctx.destroy(linger=LINGER_MS)


def _drain(sock: zmq.Socket, timeout_s: float) -> list[Any]:
    """Every message waiting on a blocking socket; waits up to timeout_s for the first."""
    out = []
    if sock.poll(int(timeout_s * 1000)):
        while sock.poll(0):
            out.append(sock.recv_pyobj())
    return out


def _bind_parent_sockets(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket, ChannelAddress]:
    commands = ctx.socket(zmq.PUSH)
    events = ctx.socket(zmq.PULL)
    for sock in (commands, events):
        sock.setsockopt(zmq.LINGER, 0)
    commands_port = commands.bind_to_random_port("tcp://127.0.0.1")
    events_port = events.bind_to_random_port("tcp://127.0.0.1")
    return commands, events, ChannelAddress(f"tcp://127.0.0.1:{commands_port}", f"tcp://127.0.0.1:{events_port}")


class ParentEnd:
    """The parent side, blocking (used by `hexgen generate` and benchmarks)."""

    def __init__(self) -> None:
        self._commands, self._events, self.address = _bind_parent_sockets(zmq.Context.instance())

    def send(self, message: Any) -> None:
        self._commands.send_pyobj(message)

    def receive(self, timeout_s: float) -> list[Any]:
        """Every waiting event; waits up to timeout_s for the first."""
        return _drain(self._events, timeout_s)

    def close(self) -> None:
        self._commands.close()
        self._events.close()


class AsyncParentEnd:
    """The parent side for an asyncio coordinator."""

    def __init__(self) -> None:
        self._commands, self._events, self.address = _bind_parent_sockets(zmq.asyncio.Context.instance())

    async def send(self, message: Any) -> None:
        await self._commands.send_pyobj(message)

    async def receive(self) -> Any:
        return await self._events.recv_pyobj()

    def close(self) -> None:
        self._commands.close()
        self._events.close()
