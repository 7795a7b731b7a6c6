"""A command waiting for a driver (none connected: the driver has just died) when the replica's channel is closed
ends in DriverGone, the replica's cue to fail its requests over, not in a cancellation of the request's task;
a command after the close too; and a task really cancelled while sending stays cancelled."""

from __future__ import annotations

import asyncio

import pytest

from hexgen.launch.channel import AsyncParentEnd, DriverGone


def test_a_command_waiting_for_a_driver_ends_in_driver_gone_when_the_channel_closes():
    async def scenario():
        parent = AsyncParentEnd()
        sending = asyncio.create_task(parent.send(("abort", "r1")))
        await asyncio.sleep(0.2)
        assert not sending.done()  # no driver: it waits (up to the command timeout)
        parent.close()
        with pytest.raises(DriverGone, match="closed before its driver took the command"):
            await asyncio.wait_for(sending, 2.0)
        with pytest.raises(DriverGone, match="channel is closed"):
            await parent.send(("abort", "r2"))

    asyncio.run(scenario())


def test_a_send_whose_task_is_cancelled_stays_cancelled():
    async def scenario():
        parent = AsyncParentEnd()
        try:
            sending = asyncio.create_task(parent.send(("abort", "r1")))
            await asyncio.sleep(0.2)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
        finally:
            parent.close()

    asyncio.run(scenario())


class StoppedRanks:
    """Ranks whose driver has died: nothing connects to the channel; stop() is all the client calls."""

    def __len__(self) -> int:
        return 1

    def stop(self, grace_s: float) -> None:
        pass


def test_a_request_sent_while_its_replica_goes_down_hears_so_and_can_be_resent():
    """The driver has died (no peer takes commands) and a request is being sent when the replica is marked down:
    the request's queue says ReplicaDown, so the coordinator re-sends it, where the closed channel used to cancel
    the request's task and leave its client waiting for ever."""
    from hexgen.engine.messages import GenerationRequest, SamplingParams
    from hexgen.plan import Replica, Stage
    from hexgen.server.replica_client import ReplicaClient, ReplicaDown

    async def scenario():
        plan = Replica((Stage("localhost", (0,), 1, (0, 2)),))
        client = ReplicaClient(0, plan, lambda address: StoppedRanks())
        client.status, client.state.is_up = "up", True
        request = GenerationRequest("r1", (1, 2, 3), SamplingParams(max_new_tokens=4))
        submitting = asyncio.create_task(client.submit(request))
        await asyncio.sleep(0.2)
        assert not submitting.done()  # the add waits for a driver
        await client.mark_down("rank 0 failed: killed")
        queue = await asyncio.wait_for(submitting, 2.0)
        assert isinstance(queue.get_nowait(), ReplicaDown)
        assert client.state.outstanding == 0 and client.status == "down"

    asyncio.run(scenario())
