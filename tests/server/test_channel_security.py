"""The channel across machines: CurveZMQ-encrypted, and a peer without the parent's server key cannot deliver."""

from __future__ import annotations

import asyncio
import dataclasses

import zmq

from hexgen.engine.messages import TokenEvent
from hexgen.launch.channel import AsyncParentEnd, RankEnd


async def _received(parent: AsyncParentEnd, timeout_s: float):
    try:
        return await asyncio.wait_for(parent.receive(), timeout_s)
    except TimeoutError:
        return None


def test_secure_channel_round_trip_and_refuses_strangers():
    async def scenario():
        parent = AsyncParentEnd(secure=True)
        assert parent.address.keys is not None
        driver = RankEnd(parent.address, receives_commands=True)
        intruder_keys = dataclasses.replace(parent.address.keys, server_public=zmq.curve_keypair()[0])
        intruder = RankEnd(dataclasses.replace(parent.address, keys=intruder_keys), receives_commands=False)
        plain = RankEnd(dataclasses.replace(parent.address, keys=None), receives_commands=False)
        try:
            for rank in (intruder, plain):
                rank.put(("events", [TokenEvent("forged", 1)]))
            driver.put(("events", [TokenEvent("r1", 7)]))
            assert await _received(parent, 5.0) == ("events", (TokenEvent("r1", 7),))
            assert await _received(parent, 1.0) is None  # nothing from the intruder or the plain peer
            await parent.send(("abort", "r1"))
            assert await asyncio.to_thread(driver.get_all, 5.0) == [("abort", "r1")]
        finally:
            for rank in (driver, intruder, plain):
                rank.close()
            parent.close()

    asyncio.run(scenario())
