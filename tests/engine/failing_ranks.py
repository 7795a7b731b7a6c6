"""Stand-in ranks (torch-free) that fail in a scripted way, for the tests of which failure a parent reports."""

from __future__ import annotations

import os
import signal
import sys
import time

from hexgen.launch.channel import ChannelAddress, RankEnd
from hexgen.launch.failure import Cause, RankFailure

STAND_IN_CONTEXT = 64  # tokens a stand-in driver says its KV pool holds a sequence
# what each kind of scripted failure says (the PEER text is gloo's, as a rank sees a dead peer)
TEXTS = {
    Cause.INPUT: "model.safetensors: tensor w has shape [32, 65] but config.json implies [32, 64]",
    Cause.INTERNAL: "RuntimeError: out of memory",
    Cause.PEER: "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:40000",
}


def fail_after(spec, delay_s: float, how: str, address: ChannelAddress) -> None:
    """Wait delay_s, then fail as `how` says: a Cause's name (report it, then exit), "signal" (SIGKILL itself,
    saying nothing), "live" (report ready, and a driver its first heartbeat, stay up until stopped) or "deaf" (as
    live, then close the channel and stay up: a driver that takes no more commands)."""
    channel = RankEnd(address, receives_commands=spec.rank == 0)
    time.sleep(delay_s)
    if how in ("live", "deaf"):
        channel.put(("ready", spec.rank))
        if spec.rank == 0:  # a driver's first heartbeat follows at once, saying how long a sequence its pool holds
            channel.put(("heartbeat", {"running": 0, "waiting": 0, "max_context": STAND_IN_CONTEXT}))
    if how == "deaf":
        channel.close()
    if how in ("live", "deaf"):
        time.sleep(60)
    if how == "signal":
        os.kill(os.getpid(), signal.SIGKILL)
    cause = Cause[how]
    channel.put(RankFailure(spec.rank, TEXTS[cause], cause).message())
    channel.close()
    sys.exit(2 if cause is Cause.INPUT else 1)
