"""Typed msgpack encoding of channel messages: plain values plus the registered message dataclasses, never pickle.

A dataclass travels as its registered name and its fields by name; decoding rebuilds it only if the name is in
MESSAGE_TYPES, so a peer can send data but never code. New fields of those dataclasses need no change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from hexgen.engine.messages import GenerationRequest, SamplingParams, TokenEvent, TokenLogprobs

DATACLASS_EXT = 1
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (SamplingParams, GenerationRequest, TokenEvent, TokenLogprobs)
}


class WireError(ValueError):
    """Bytes that are not a well-formed message of a registered type."""


def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, int):  # msgpack asks here only for integers it cannot hold
        raise OverflowError(f"integer {obj} does not fit in 64 bits")
    name = type(obj).__name__
    if not dataclasses.is_dataclass(obj) or MESSAGE_TYPES.get(name) is not type(obj):
        raise TypeError(f"{name} is not a registered channel message type")
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return msgpack.ExtType(DATACLASS_EXT, msgpack.packb([name, values], default=_default))


def _ext_hook(code: int, data: bytes) -> Any:
    if code != DATACLASS_EXT:
        raise WireError(f"unknown extension type {code}")
    name, values = _unpack(data)
    cls = MESSAGE_TYPES.get(name)
    if cls is None or not isinstance(values, dict):
        raise WireError(f"{name!r} is not a registered channel message type")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise WireError(f"bad {name}: {err}") from None


def _unpack(data: bytes) -> Any:
    # Arrays come back as tuples (messages are tuples; dataclass sequence fields are tuples).
    return msgpack.unpackb(data, ext_hook=_ext_hook, use_list=False, strict_map_key=False)


def encode(message: Any) -> bytes:
    return msgpack.packb(message, default=_default)


def decode(data: bytes) -> Any:
    try:
        return _unpack(data)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise WireError(f"malformed message: {err}") from None
