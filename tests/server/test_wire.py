"""The channel's typed encoding: registered messages round-trip; pickles, unknown types and bad fields are refused."""

from __future__ import annotations

import pickle

import msgpack
import pytest

from hexgen.engine.messages import GenerationRequest, SamplingParams, TokenEvent
from hexgen.launch.wire import WireError, decode, encode


def test_messages_round_trip():
    request = GenerationRequest("r1", (5, 6, 7), SamplingParams(max_new_tokens=3, seed=4, stop_token_ids=(2,)))
    assert decode(encode(("add", request))) == ("add", request)
    events = [TokenEvent("r1", 9), TokenEvent("r1", None, "abort")]
    assert decode(encode(("events", events))) == ("events", tuple(events))
    assert decode(encode(("heartbeat", {"running": 1, "kv_blocks_free": 30}))) == ("heartbeat", {"running": 1,
                                                                                                 "kv_blocks_free": 30})
    assert decode(encode(("error", 2, "boom"))) == ("error", 2, "boom")


@pytest.mark.parametrize(("seed", "kept"), [(2**70 + 5, 5), (-1, 2**64 - 1), (2**64, 0), (7, 7)])
def test_any_integer_seed_travels_as_its_low_64_bits(seed, kept):
    request = GenerationRequest("r1", (5,), SamplingParams(seed=seed, temperature=1.0))
    assert request.params.seed == kept
    assert decode(encode(("add", request))) == ("add", request)


def test_unregistered_types_are_refused_both_ways():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(TypeError):
        encode(("add", Evil()))
    with pytest.raises(WireError):
        decode(pickle.dumps(("add", Evil())))
    forged = msgpack.packb(["add", msgpack.ExtType(1, msgpack.packb(["Popen", {"args": ["true"]}]))])
    with pytest.raises(WireError, match="not a registered"):
        decode(forged)


def test_bad_fields_are_a_wire_error():
    forged = msgpack.ExtType(1, msgpack.packb(["SamplingParams", {"max_new_tokens": 0}]))
    with pytest.raises(WireError, match="max_new_tokens"):
        decode(msgpack.packb(["add", forged]))
    unknown_field = msgpack.ExtType(1, msgpack.packb(["TokenEvent", {"request_id": "a", "token_id": 1, "x": 2}]))
    with pytest.raises(WireError):
        decode(msgpack.packb(unknown_field))
