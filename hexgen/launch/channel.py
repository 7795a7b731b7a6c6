"""Typed messages (hexgen/launch/wire.py, never pickle) between a parent (CLI or coordinator) and a replica's ranks
over ZeroMQ.

Two sockets per replica, both bound by the parent on ports it picks (loopback, or the coordinator's node address
when ranks run on other machines):
  commands  parent PUSH -> driver PULL     ("add", request) / ("abort", id) / ("shutdown",)
  events    every rank PUSH -> parent PULL  ("loaded", rank, n) / ("ready", rank) / ("error", rank, text)
                                            / ("events", [TokenEvent]) / ("rejected", id, text) / ("heartbeat", stats)
Over TCP, so a replica on another machine can use the same code with the parent's address. A message that does
not decode to a registered type is dropped. A channel that leaves loopback (`secure`) is encrypted with CurveZMQ:
only a peer given the parent's server key, which travels to the ranks through Ray only, completes the handshake.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from hexgen.launch.wire import WireError, decode, encode

LINGER_MS = 1000  # let a dying rank's last message (its error) leave before the socket closes
# A PUSH socket with no peer waits for one: a command to a driver whose process has ended would wait forever. So
# the parent's commands never wait for room (no high-water mark) and give up after this long with DriverGone.
COMMAND_TIMEOUT_MS = 5000


class DriverGone(ConnectionError):
    """A command found no driver to take it: the replica's driver rank has ended."""


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys (Z85) of a secure channel: the parent's public key and the ranks' own key pair."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes


@dataclass(frozen=True)
class ChannelAddress:
    commands: str
    events: str
    keys: CurveKeys | None = None  # None: plain TCP (loopback only)


def _connect(sock: zmq.Socket, endpoint: str, keys: CurveKeys | None) -> None:
    if keys is not None:
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.client_public
        sock.curve_secretkey = keys.client_secret
    sock.connect(endpoint)


class RankEnd:
    """The rank side: every rank sends events; the driver also receives commands."""

    def __init__(self, address: ChannelAddress, receives_commands: bool):
        self._ctx = zmq.Context()
        self._events = self._ctx.socket(zmq.PUSH)
        self._events.setsockopt(zmq.LINGER, LINGER_MS)
        _connect(self._events, address.events, address.keys)
        self._commands = None
        if receives_commands:
            self._commands = self._ctx.socket(zmq.PULL)
            _connect(self._commands, address.commands, address.keys)

    def put(self, message: Any) -> None:
        self._events.send(encode(message))

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
            try:
                out.append(decode(sock.recv()))
            except WireError:
                continue
    return out


def _bind_parent_sockets(
    ctx: zmq.Context, host: str, secure: bool = False
) -> tuple[zmq.Socket, zmq.Socket, ChannelAddress]:
    commands = ctx.socket(zmq.PUSH)
    events = ctx.socket(zmq.PULL)
    keys = None
    if secure:
        server_public, server_secret = zmq.curve_keypair()
        keys = CurveKeys(server_public, *zmq.curve_keypair())
    commands.setsockopt(zmq.SNDHWM, 0)
    commands.setsockopt(zmq.SNDTIMEO, COMMAND_TIMEOUT_MS)
    for sock in (commands, events):
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = server_public, server_secret
    commands_port = commands.bind_to_random_port(f"tcp://{host}")
    events_port = events.bind_to_random_port(f"tcp://{host}")
    return commands, events, ChannelAddress(f"tcp://{host}:{commands_port}", f"tcp://{host}:{events_port}", keys)


class ParentEnd:
    """The parent side, blocking (used by `hexgen generate` and benchmarks)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._commands, self._events, self.address = _bind_parent_sockets(zmq.Context.instance(), host)

    def send(self, message: Any) -> None:
        """Hand a command to the driver; DriverGone if none takes it."""
        try:
            self._commands.send(encode(message))
        except zmq.Again:
            raise DriverGone(f"no driver took a command within {COMMAND_TIMEOUT_MS / 1000:.0f} s") from None

    def receive(self, timeout_s: float) -> list[Any]:
        """Every waiting event; waits up to timeout_s for the first."""
        return _drain(self._events, timeout_s)

    def close(self) -> None:
        self._commands.close()
        self._events.close()


class AsyncParentEnd:
    """The parent side for an asyncio coordinator."""

    def __init__(self, host: str = "127.0.0.1", secure: bool = False) -> None:
        self._commands, self._events, self.address = _bind_parent_sockets(
            zmq.asyncio.Context.instance(), host, secure
        )

    async def send(self, message: Any) -> None:
        """Hand a command to the driver; DriverGone if none takes it, or if the channel is closed before one does
        (a command waits while no driver is connected, as when the driver has just died: the replica is then stopped
        and its channel closed, which would otherwise cancel the send, and with it the request's task)."""
        if self._commands.closed:
            raise DriverGone("the replica's channel is closed")
        try:
            await self._commands.send(encode(message))
        except zmq.Again:
            raise DriverGone(f"no driver took a command within {COMMAND_TIMEOUT_MS / 1000:.0f} s") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._commands.closed and not (task is not None and task.cancelling()):
                raise DriverGone("the replica's channel closed before its driver took the command") from None
            raise

    async def receive(self) -> Any:
        while True:
            try:
                return decode(await self._events.recv())
            except WireError:
                continue

    def close(self) -> None:
        self._commands.close()
        self._events.close()
