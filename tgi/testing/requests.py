"""Requests through a `ServerState`'s router without HTTP: submit, then collect events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tgi.router.request import Event
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters
from tgi.server.state import ServerState

__all__ = ["collect", "submit"]


def submit(state: ServerState, prompt: str, **params: Any) -> RequestHandle:
    """Validate `prompt` with `params` (TGI's `parameters`) and queue it."""
    return state.router.submit(state.validator.validate(prompt, ClientParameters(**params)))


async def collect(
    events: RequestHandle | AsyncIterator[Event], timeout_s: float = 60
) -> list[Event]:
    """The remaining events of a handle (or of its `events()` iterator), bounded in time."""
    stream = events.events() if isinstance(events, RequestHandle) else events

    async def drain() -> list[Event]:
        return [event async for event in stream]

    return await asyncio.wait_for(drain(), timeout=timeout_s)
