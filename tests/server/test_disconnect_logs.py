"""A client leaving a non-streamed request, or one of several requests failing, logs
nothing: no "exception was never retrieved" with a traceback (issue 17)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tgi.errors import GenerationError
from tgi.router.request import ErrorEvent
from tgi.server import serving


class Handle:
    """A request that never finishes, or fails at once; records its cancel."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.cancelled = False

    async def events(self) -> AsyncIterator[Any]:
        if self.fail:
            yield ErrorEvent(message="boom", error_type="generation")
            return
        await asyncio.Event().wait()
        yield None  # pragma: no cover - never reached

    def cancel(self) -> None:
        self.cancelled = True


class Client:
    """A request's connection: gone at once, or after `gone` is set."""

    def __init__(self, gone: asyncio.Event) -> None:
        self.gone = gone

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


@pytest.fixture
async def loop_complaints() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports to its exception handler (where the "never retrieved"
    messages go, with their tracebacks) while the test runs."""
    loop = asyncio.get_running_loop()
    complaints: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: complaints.append(context))
    try:
        yield complaints
    finally:
        loop.set_exception_handler(previous)


async def settle() -> None:
    """Let cancelled tasks finish, then collect what nobody holds any more."""
    for _ in range(10):
        await asyncio.sleep(0)
    gc.collect()
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_client_leaving_a_non_streamed_request_logs_nothing(
    loop_complaints: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    gone = asyncio.Event()
    gone.set()
    handles = [Handle(), Handle()]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(GenerationError, match="client disconnected"):
            await serving.final_events(handles, Client(gone))  # type: ignore[arg-type]
        await settle()
    assert [handle.cancelled for handle in handles] == [True, True]
    assert [context.get("message") for context in loop_complaints] == []
    assert "never retrieved" not in caplog.text


async def test_one_failure_among_several_logs_nothing_else(
    loop_complaints: list[dict[str, Any]],
) -> None:
    handles = [Handle(), Handle(fail=True), Handle()]
    with pytest.raises(GenerationError, match="boom"):
        await serving.final_events(handles, Client(asyncio.Event()))  # type: ignore[arg-type]
    await settle()
    assert [handle.cancelled for handle in handles] == [True, True, True]
    assert [context.get("message") for context in loop_complaints] == []


async def test_the_waiting_route_cancelled_cancels_its_requests(
    loop_complaints: list[dict[str, Any]],
) -> None:
    handles = [Handle(), Handle()]
    waiting = asyncio.ensure_future(serving.final_events(handles, Client(asyncio.Event())))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await settle()
    assert [handle.cancelled for handle in handles] == [True, True]
    assert [context.get("message") for context in loop_complaints] == []
