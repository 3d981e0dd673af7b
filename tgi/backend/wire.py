"""The typed encoding of what crosses between the router and the engine: msgpack, no pickle.

NOTE: every message is a plain frozen dataclass of `tgi.backend.contract` (or
`tgi.engine.results.StepResult`, or one of the worker channel's own messages in
`tgi.engine.worker.messages`); msgspec encodes it field by field and decodes it
back against the class's own annotations, so the receiver gets the same types it would
have built itself (tuples stay tuples, frozensets frozensets, `int` dict keys ints,
enums their members) and anything else fails loudly instead of arriving as a dict.
Tensors never cross: `StepOutput` stays inside the engine.

On the wire a message is a three-item array, so a payload read as the wrong message
or by a process speaking another contract version is refused rather than half-read
(msgspec ignores unknown fields and fills defaults, so a `StepResult` would otherwise
decode as an empty `StepPlan`):

    [ "StepPlan", 2, {"new": [...], "running": [...], "finished": [...], ...} ]
      name        contract version   the dataclass's fields, by name

Usage:

    data = encode(plan)                  # bytes
    plan = decode(data, StepPlan)        # a StepPlan equal to the one encoded
    message = decode_any(data, (StepPlan, Query))   # whichever of these it holds
"""

from __future__ import annotations

from typing import Any, TypeVar, get_args

import msgspec

from tgi.backend.contract import (
    CONTRACT_VERSION,
    Capabilities,
    KVUsage,
    Limits,
    StepPlan,
    WarmupReport,
)
from tgi.engine.protocol import EngineStats
from tgi.engine.results import StepResult
from tgi.engine.worker.messages import (
    Done,
    Query,
    Release,
    StartWorker,
    WorkerFailure,
    WorkerReady,
)
from tgi.errors import BackendError

__all__ = ["MESSAGE_TYPES", "Message", "MessageT", "WireError", "decode", "decode_any", "encode"]

# Every type that may cross: the router sends Limits and StepPlans; the engine answers
# with Capabilities, a WarmupReport, StepResults and KVUsage; the worker channel adds
# its start-up, release and query messages and their answers.
Message = (
    Capabilities
    | KVUsage
    | Limits
    | StepPlan
    | StepResult
    | WarmupReport
    | StartWorker
    | WorkerReady
    | Release
    | Query
    | Done
    | EngineStats
    | WorkerFailure
)
MESSAGE_TYPES: tuple[type, ...] = get_args(Message)
MessageT = TypeVar("MessageT", bound=Message)


class WireError(BackendError):
    """The bytes are not the message the receiver expects: a bug, or a router and an
    engine of different tgi versions. Names the message and where it went wrong."""


_ENCODER = msgspec.msgpack.Encoder()
_HEADER = msgspec.msgpack.Decoder(tuple[str, int, msgspec.Raw])
_DECODERS: dict[type, msgspec.msgpack.Decoder[Any]] = {
    kind: msgspec.msgpack.Decoder(kind) for kind in MESSAGE_TYPES
}
_BY_NAME: dict[str, type] = {kind.__name__: kind for kind in MESSAGE_TYPES}


def encode(message: Message) -> bytes:
    """The message as msgpack bytes. Raises TypeError for a type that may not cross, or
    for a field holding something other than plain data (a tensor, say)."""
    kind = type(message)
    if kind not in _DECODERS:
        raise TypeError(f"{kind.__name__} does not cross the wire; send one of {_names()}")
    return _ENCODER.encode((kind.__name__, CONTRACT_VERSION, message))


def decode(data: bytes, kind: type[MessageT]) -> MessageT:
    """The `kind` message `data` holds, typed and validated field by field.

    Raises `WireError` when `data` is not msgpack, holds another message, comes from
    another contract version, or has a field of the wrong type.
    """
    if kind not in _DECODERS:
        raise TypeError(f"{kind.__name__} does not cross the wire; expect one of {_names()}")
    message: MessageT = decode_any(data, (kind,))
    return message


def decode_any(data: bytes, kinds: tuple[type, ...]) -> Any:
    """The message `data` holds, which must be one of `kinds` (a receiver that accepts
    several: a worker reading plans and queries, a front reading a result or a failure).

    Raises `WireError` as `decode` does.
    """
    expected = " or ".join(kind.__name__ for kind in kinds)
    try:
        name, version, payload = _HEADER.decode(data)
    except msgspec.DecodeError as exc:
        raise WireError(f"expected a {expected} message: {exc}") from exc
    kind = _BY_NAME.get(name)
    if kind is None or kind not in kinds:
        raise WireError(f"expected a {expected} message, got a {name!r} one")
    if version != CONTRACT_VERSION:
        raise WireError(
            f"{name} message of contract version {version}; this process speaks "
            f"version {CONTRACT_VERSION} (router and engine must run the same tgi)"
        )
    try:
        return _DECODERS[kind].decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise WireError(f"malformed {name} message: {exc}") from exc


def _names() -> str:
    return ", ".join(kind.__name__ for kind in MESSAGE_TYPES)
