"""When one rank fails its peers fail too (a gloo receive from a dead rank raises): the parent names the rank that
failed first, whichever error reaches it first. The pure rules (classify, settle) against hand-made failures; then
real processes whose errors race, through the CLI's LocalReplica and the server's ReplicaClient. And a command to a
driver that has gone fails instead of waiting forever."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from engine_helpers import greedy_requests
from failing_ranks import TEXTS, fail_after

from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.errors import ConfigError
from hexgen.launch import channel
from hexgen.launch.failure import Cause, RankFailure, classify, first_cause, settle, settle_async
from hexgen.launch.local import LocalReplica, RankProcesses, ReplicaFailed
from hexgen.launch.spec import Layout, RankSpec
from hexgen.plan import Replica, Stage
from hexgen.server.replica_client import ReplicaClient, ReplicaDown, ReplicaStartError

GLOO_PEER_LOSS = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:63169. This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize(("err", "is_input", "cause"), [
    (ConfigError("tensor w has shape [1] but config.json implies [2]"), True, Cause.INPUT),
    (RuntimeError(GLOO_PEER_LOSS), False, Cause.PEER),
    (RuntimeError("shared-memory all-reduce: a TP peer did not arrive within 120 s"), False, Cause.PEER),
    (RuntimeError("NCCL error: remote process exited or there was a network error"), False, Cause.PEER),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False, Cause.INTERNAL),
    (ValueError("bad shape"), False, Cause.INTERNAL),
])
def test_classify(err, is_input, cause):
    assert classify(err, is_input) is cause


def test_a_message_without_a_cause_is_internal():
    assert RankFailure.of(("error", 3, "boom")) == RankFailure(3, "boom", Cause.INTERNAL)
    assert RankFailure.of(("error", 1, "x", 7)).cause is Cause.INTERNAL  # an unknown cause
    failure = RankFailure(1, "bad", Cause.INPUT)
    assert RankFailure.of(failure.message()) == failure


def test_first_cause_prefers_the_lower_cause_then_the_first():
    peer, internal, internal2, user = (RankFailure(0, "p", Cause.PEER), RankFailure(1, "i", Cause.INTERNAL),
                                       RankFailure(2, "j", Cause.INTERNAL), RankFailure(3, "u", Cause.INPUT))
    assert first_cause([peer, internal, internal2]) is internal
    assert first_cause([peer, internal2, internal]) is internal2
    assert first_cause([internal, peer, user]) is user


def scripted(batches: list[list[tuple]]):
    """receive(timeout_s) returning the given batches in turn, then nothing; records its calls."""
    calls = []

    def receive(timeout_s: float) -> list[tuple]:
        calls.append(timeout_s)
        return batches.pop(0) if batches else []
    return receive, calls


def test_settle_waits_past_a_lost_peer_for_the_cause():
    receive, calls = scripted([[], [("events", [])], [RankFailure(1, "bad file", Cause.INPUT).message()]])
    assert settle([RankFailure(0, "lost", Cause.PEER)], receive, grace_s=5.0) == RankFailure(1, "bad file", Cause.INPUT)
    assert len(calls) == 3  # stopped at the cause


def test_settle_does_not_wait_with_a_cause_in_hand():
    receive, calls = scripted([[RankFailure(0, "x", Cause.INPUT).message()]])
    assert settle([RankFailure(1, "oom", Cause.INTERNAL)], receive).cause is Cause.INTERNAL
    assert calls == []


def test_settle_gives_up_after_the_grace():
    receive, calls = scripted([])
    started = time.monotonic()
    assert settle([RankFailure(0, "lost", Cause.PEER)], receive, grace_s=0.3).rank == 0
    assert 0.25 < time.monotonic() - started < 2.0 and calls


def test_settle_async_waits_for_the_cause():
    async def run(messages: list[tuple], grace_s: float) -> RankFailure:
        queue: asyncio.Queue = asyncio.Queue()
        for m in messages:
            queue.put_nowait(m)
        return await settle_async([RankFailure(0, "lost", Cause.PEER)], queue.get, grace_s)

    cause = RankFailure(2, "oom", Cause.INTERNAL)
    assert asyncio.run(run([("heartbeat", {}), cause.message()], 5.0)) == cause
    assert asyncio.run(run([("heartbeat", {})], 0.2)).rank == 0


def stand_in_ranks(scripts: list[tuple[float, str]]) -> list[tuple]:
    """rank_args for fail_after: rank r waits scripts[r][0] s, then fails as scripts[r][1] says."""
    layout = Layout((1,) * len(scripts), tuple((i, i + 1) for i in range(len(scripts))))
    return [(RankSpec(None, layout, rank), delay_s, how) for rank, (delay_s, how) in enumerate(scripts)]


@pytest.mark.parametrize(("scripts", "expected"), [
    # the peer's error arrives first; the input error half a second later is the one reported
    ([(0.0, "PEER"), (0.5, "INPUT")], f"rank 1: {TEXTS[Cause.INPUT]}"),
    ([(0.5, "INTERNAL"), (0.0, "PEER"), (0.0, "live")], f"rank 0: {TEXTS[Cause.INTERNAL]}"),
    # a rank killed by a signal says nothing: its exit is the cause, not the peer that lost it
    ([(0.3, "PEER"), (0.0, "signal")], "rank 1 exited with code -9"),
    # only lost peers and no one exited silently: after the grace, the first of them
    ([(0.0, "PEER"), (0.0, "live")], f"rank 0: {TEXTS[Cause.PEER]}"),
])
def test_the_cli_names_the_rank_that_failed_first(scripts, expected):
    replica = LocalReplica(fail_after, stand_in_ranks(scripts))
    with pytest.raises(ReplicaFailed) as failed:
        replica.start(timeout_s=30)
    assert str(failed.value) == expected
    assert not any(p.is_alive() for p in replica.processes.procs)


def test_the_server_names_the_rank_that_failed_first():
    plan = Replica((Stage("localhost", (0,), 1, (0, 1)), Stage("localhost", (1,), 1, (1, 2))))
    client = ReplicaClient(0, plan, lambda address: RankProcesses(
        fail_after, [(*args, address) for args in stand_in_ranks([(0.0, "PEER"), (0.5, "INPUT")])]))
    with pytest.raises(ReplicaStartError) as failed:
        asyncio.run(client.start(timeout_s=30))
    assert str(failed.value) == f"replica 0 rank 1: {TEXTS[Cause.INPUT]}"
    assert not any(p.is_alive() for p in client.processes.procs)


def in_thread(fn, limit_s: float) -> None:
    """Run fn; fail (rather than hang the suite) if it has not returned within limit_s."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            errors.append(err)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still waiting after {limit_s} s"
    if errors:
        raise errors[0]


@pytest.fixture
def short_command_timeout(monkeypatch):
    monkeypatch.setattr(channel, "COMMAND_TIMEOUT_MS", 300)


def test_a_command_no_driver_takes_fails(short_command_timeout):
    parent = channel.ParentEnd()
    try:
        with pytest.raises(channel.DriverGone):
            in_thread(lambda: parent.send(("shutdown",)), limit_s=10)
    finally:
        parent.close()


def test_the_cli_stops_a_replica_whose_driver_went_deaf(short_command_timeout):
    replica = LocalReplica(fail_after, stand_in_ranks([(0.0, "deaf"), (0.0, "live")]))
    replica.start(timeout_s=30)
    time.sleep(0.5)  # the driver's channel has closed
    with pytest.raises(ReplicaFailed, match="rank 0: no driver took a command"):
        in_thread(lambda: replica.submit(greedy_requests([[1, 2]], 4)[0]), limit_s=15)
    assert replica.closed and not any(p.is_alive() for p in replica.processes.procs)
    replica = LocalReplica(fail_after, stand_in_ranks([(0.0, "deaf"), (0.0, "live")]))
    replica.start(timeout_s=30)
    time.sleep(0.5)
    in_thread(replica.close, limit_s=15)  # every process alive, the driver deaf: no shutdown reaches it
    assert not any(p.is_alive() for p in replica.processes.procs)


def test_the_server_fails_over_from_a_driver_that_went_deaf(short_command_timeout):
    plan = Replica((Stage("localhost", (0,), 1, (0, 1)), Stage("localhost", (1,), 1, (1, 2))))

    async def run() -> object:
        client = ReplicaClient(0, plan, lambda address: RankProcesses(
            fail_after, [(*args, address) for args in stand_in_ranks([(0.0, "deaf"), (0.0, "live")])]))
        await client.start(timeout_s=30)
        await asyncio.sleep(0.5)
        queue = await asyncio.wait_for(client.submit(greedy_requests([[1, 2]], 4)[0]), timeout=15)
        item = queue.get_nowait()
        assert client.status == "down" and not any(p.is_alive() for p in client.processes.procs)
        return item

    item = asyncio.run(run())
    assert isinstance(item, ReplicaDown) and "rank 0 failed: no driver took a command" in item.reason


def test_a_request_the_channel_cannot_carry_is_forgotten():
    """submit() that fails to send leaves no outstanding request behind (the replica stays up for the next)."""
    plan = Replica((Stage("localhost", (0,), 1, (0, 1)),))

    async def run() -> None:
        client = ReplicaClient(0, plan, lambda address: RankProcesses(
            fail_after, [(*args, address) for args in stand_in_ranks([(0.0, "live")])]))
        await client.start(timeout_s=30)
        try:
            with pytest.raises(OverflowError):  # msgpack carries integers of at most 64 bits
                await client.submit(GenerationRequest("big", (2**70,), SamplingParams()))
            assert client.state.outstanding == 0 and client.status == "up"
            await client.submit(greedy_requests([[1, 2]], 4)[0])
            assert client.state.outstanding == 1
        finally:
            await client.close()

    asyncio.run(run())
