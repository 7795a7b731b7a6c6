"""Requests under failure and disconnection at the awkward moments: a real ReplicaClient over a real loopback ZeroMQ
channel with a driver played by this process (or by nobody: a driver that has died), and the real FastAPI app
driven as uvicorn drives it. Each case once lost a request or left something behind."""

from __future__ import annotations

import asyncio
import json
import time

import zmq
from fake_replicas import FakeReplica, make_coordinator

from hexgen.engine.messages import GenerationRequest, SamplingParams, TokenEvent
from hexgen.launch.failure import Cause
from hexgen.launch.wire import decode, encode
from hexgen.plan import Replica, Stage
from hexgen.server.app import create_app
from hexgen.server.coordinator import SHUTTING_DOWN
from hexgen.server.protocol import APIError
from hexgen.server.replica_client import ReplicaClient


class Ranks:
    """The replica's ranks as the client sees them: `failure` when one has ended; stop() takes stop_s."""

    def __init__(self, stop_s: float = 0.0):
        self.failure: str | None = None
        self.stop_s = stop_s
        self.stopped = False

    def __len__(self) -> int:
        return 1

    def start(self) -> None:
        pass

    def first_failure(self) -> str | None:
        return self.failure

    def stop(self, grace_s: float = 0.0) -> None:
        time.sleep(self.stop_s)
        self.stopped = True

    def placement(self, rank: int) -> dict:
        return {}


class Driver:
    """The driver rank's two sockets; takes_commands=False: a driver that has died (nothing takes commands)."""

    def __init__(self, client: ReplicaClient, takes_commands: bool = True):
        self.ctx = zmq.Context()
        self.events = self.ctx.socket(zmq.PUSH)
        self.events.connect(client.channel.address.events)
        self.commands = self.ctx.socket(zmq.PULL) if takes_commands else None
        if self.commands is not None:
            self.commands.connect(client.channel.address.commands)

    def put(self, message: tuple) -> None:
        self.events.send(encode(message))

    def received(self) -> list[tuple]:
        out = []
        while self.commands is not None and self.commands.poll(200):
            out.append(decode(self.commands.recv()))
        return out

    def close(self) -> None:
        self.ctx.destroy(linger=0)


async def started(index: int, stop_s: float = 0.0, takes_commands: bool = True) -> tuple[ReplicaClient, Ranks, Driver]:
    ranks = Ranks(stop_s)
    client = ReplicaClient(index, Replica((Stage("localhost", (0,), 1, (0, 2)),)), lambda address: ranks)
    driver = Driver(client, takes_commands)
    driver.put(("ready", 0))
    driver.put(("heartbeat", {"running": 0, "waiting": 0, "max_context": 64}))
    await asyncio.wait_for(client.start(), 5)
    return client, ranks, driver


def request(rid: str = "r1") -> GenerationRequest:
    return GenerationRequest(rid, (1, 2, 3), SamplingParams(max_new_tokens=4, ignore_eos=True))


def test_the_drivers_last_tokens_after_a_followers_peer_loss_still_reach_their_request():
    """A follower reports a lost peer; the driver's last step (the request's final token) arrives after that report,
    while the client waits for the rank that caused it: the request ends with that token, not ReplicaDown."""

    async def scenario():
        client, _, driver = await started(0)
        try:
            queue = await client.submit(request())
            driver.put(("error", 1, "RuntimeError: Connection closed by peer", int(Cause.PEER)))
            driver.put(("events", [TokenEvent("r1", 6, "length")]))
            assert await asyncio.wait_for(queue.get(), 2) == TokenEvent("r1", 6, "length")
            driver.put(("error", 0, "RuntimeError: boom", int(Cause.INTERNAL)))
            for _ in range(40):
                if client.status == "down":
                    break
                await asyncio.sleep(0.05)
            assert client.status == "down" and client.down_reason == "rank 0 failed: RuntimeError: boom"
        finally:
            driver.close()
            await client.close()

    asyncio.run(scenario())


def test_a_request_failing_over_when_the_server_ends_requests_hears_so_instead_of_being_resent():
    """Replica A's driver has died; a request's add waits on it. A is marked down (its ranks take 1 s to stop), and
    the server ends every request meanwhile: the request, between replicas then, gets the 503 the others get
    rather than going on on replica B."""

    async def scenario():
        a, a_ranks, a_driver = await started(0, stop_s=1.0, takes_commands=False)
        b, _, b_driver = await started(1)
        coord = make_coordinator([a, b], max_context=64)
        try:
            async def run():
                async for _ in coord.stream_text(request(), (), restartable=True):
                    pass

            running = asyncio.create_task(run())
            await asyncio.sleep(0.2)
            a_ranks.failure = "rank 0 exited with code -9"  # the watch loop sees it and starts stopping A
            await asyncio.sleep(0.8)
            assert a.status == "down" and not a_ranks.stopped
            coord.end_requests(SHUTTING_DOWN)
            try:
                await asyncio.wait_for(running, 5)
                raise AssertionError("the request ran on")
            except APIError as err:
                assert (err.status, err.message) == (503, SHUTTING_DOWN)
            assert b_driver.received() == [] and not b._queues
        finally:
            for driver in (a_driver, b_driver):
                driver.close()
            for client in (a, b):
                await client.close()

    asyncio.run(scenario())


def test_a_replica_stopped_by_a_task_then_cancelled_still_closes_its_channel(monkeypatch):
    """A request's own send finds no driver (DriverGone after the command timeout), so its task marks the replica
    down and waits for the ranks to stop; the client then leaves and that task is cancelled: the channel's sockets
    are closed all the same."""
    import hexgen.launch.channel as channel

    monkeypatch.setattr(channel, "COMMAND_TIMEOUT_MS", 300)  # read when the sockets are bound

    async def scenario():
        client, ranks, driver = await started(0, stop_s=1.0, takes_commands=False)
        try:
            sending = asyncio.create_task(client.submit(request()))
            await asyncio.sleep(0.6)
            assert client.status == "down" and not ranks.stopped
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            await asyncio.sleep(1.2)
            assert ranks.stopped
            assert client.channel._commands.closed and client.channel._events.closed
        finally:
            driver.close()
            await client.close()

    asyncio.run(scenario())


async def call(app, body: dict, client_gone: asyncio.Event) -> list[dict]:
    """One POST to /v1/completions as uvicorn makes it; the client leaves when client_gone is set."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    body_sent, sent = False, []

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await client_gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_a_client_leaving_before_the_first_token_releases_its_request_streamed_or_not():
    """Queued or prefilling, no token yet, and the client gives up: the sequence is aborted on its replica within
    a poll (it used to stay there, holding KV blocks and counting towards the 429 limit, until a first token)."""

    async def scenario(stream: bool):
        replica = FakeReplica(0)  # holds the request: no tokens come
        coord = make_coordinator([replica], max_context=64)
        gone = asyncio.Event()
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 5, "stream": stream}
        handling = asyncio.create_task(call(create_app(coord), body, gone))
        await asyncio.sleep(0.1)
        assert replica.state.outstanding == 1
        gone.set()
        sent = await asyncio.wait_for(handling, 2)
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
        assert replica.state.outstanding == 0 and [abort for _, abort in replica.released] == [True]
        assert coord.admitted == 0

    for stream in (False, True):
        asyncio.run(scenario(stream))


def test_a_handler_cancelled_by_the_server_aborts_its_sequence():
    """A stopping server cancels the handlers still running: their sequences are aborted, not left unowned."""

    async def scenario():
        replica = FakeReplica(0)  # holds the request: no tokens come
        coord = make_coordinator([replica], max_context=64)
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 5}
        handling = asyncio.create_task(call(create_app(coord), body, asyncio.Event()))
        await asyncio.sleep(0.1)
        handling.cancel()
        await asyncio.gather(handling, return_exceptions=True)
        await asyncio.sleep(0.1)
        assert replica.state.outstanding == 0 and [abort for _, abort in replica.released] == [True]

    asyncio.run(scenario())
