"""What the chat and completion routes share: submitting, waiting, SSE framing, ids.

Submitting takes the steps /generate takes (`tgi.server.serving`): the concurrency
check first, then the router's `Validator` (with TGI's messages), then the router.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from tgi import __version__
from tgi.errors import Overloaded, TgiError
from tgi.router.request import (
    ErrorEvent,
    FinalEvent,
    FinishReason,
    TokenEvent,
)
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters
from tgi.server.access import note_final
from tgi.server.openai.errors import describe, openai_error
from tgi.server.serving import check_capacity, validate
from tgi.server.state import ServerState

__all__ = [
    "DONE",
    "Event",
    "Identity",
    "error_event",
    "failure_event",
    "finish_reason",
    "finite",
    "merged_events",
    "sse",
    "submit_all",
]

Event = TokenEvent | FinalEvent | ErrorEvent

DONE = "data: [DONE]\n\n"

_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's name for why a sequence ended (TGI's `format(true)`, and stop sequences
    as OpenAI names them too)."""
    return _FINISH_REASONS[reason]


class Identity:
    """The fields every body of one response repeats: id, created, model, fingerprint."""

    __slots__ = ("created", "fingerprint", "id", "model")

    def __init__(self, prefix: str, state: ServerState, model: str | None) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model or state.model.model_id
        # TGI's system_fingerprint: "<version>-<docker label or native>"
        label = state.config.environ.get("DOCKER_LABEL") or "native"
        self.fingerprint = f"{__version__}-{label}"

    def fields(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }


def finite(logprob: float) -> float:
    """JSON has no -inf: a token the sampler ruled out (top_p, a grammar) gets OpenAI's
    floor of -9999.0, and the spec's logprob stays a number."""
    return logprob if math.isfinite(logprob) else -9999.0


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def error_event(exc: TgiError, *, openai_shape: bool) -> str:
    """A mid-stream failure as one SSE event, in the route family's error shape."""
    _, message, error_type = describe(exc)
    return failure_event(message, error_type, openai_shape=openai_shape)


def failure_event(message: str, error_type: str, *, openai_shape: bool) -> str:
    if openai_shape:
        return sse(openai_error(message, error_type))
    return sse({"error": message, "error_type": error_type})


async def submit_all(
    state: ServerState,
    prompts: list[str],
    params: ClientParameters,
    *,
    add_special_tokens: bool = True,
) -> list[RequestHandle]:
    """Validate every prompt, then submit them all, or none (a failure cancels the rest)."""
    check_capacity(state, len(prompts))
    validated = [
        await validate(state, prompt, params, add_special_tokens=add_special_tokens)
        for prompt in prompts
    ]
    handles: list[RequestHandle] = []
    try:
        for request in validated:
            handles.append(state.router.submit(request))
    except Overloaded:
        for handle in handles:
            handle.cancel()
        raise
    return handles


async def merged_events(
    handles: list[RequestHandle], keep_alive_s: float
) -> AsyncIterator[tuple[int, Event] | None]:
    """The events of several requests as they come, tagged with the request's index,
    and None after `keep_alive_s` of silence (for an SSE comment).

    Closing the iterator early (the client left) cancels every request. A pending
    `anext` is never cancelled for a keep-alive: that would close its event generator.
    """
    streams = [cast(AsyncGenerator[Event, None], handle.events()) for handle in handles]
    pending: dict[asyncio.Future[Any], int] = {
        asyncio.ensure_future(anext(stream)): index for index, stream in enumerate(streams)
    }
    try:
        while pending:
            done, _ = await asyncio.wait(
                pending, timeout=keep_alive_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                yield None
                continue
            for future in sorted(done, key=lambda f: pending[f]):
                index = pending.pop(future)
                try:
                    event = future.result()
                except StopAsyncIteration:
                    continue
                if isinstance(event, TokenEvent):
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
                elif isinstance(event, FinalEvent):
                    note_final(event)
                yield index, event
    finally:
        busy = set(pending.values())
        for future in pending:
            future.cancel()  # closes that event generator, which cancels its request
        for index, stream in enumerate(streams):
            if index not in busy:
                await stream.aclose()
        for handle in handles:
            handle.cancel()  # a no-op for finished requests
