"""The serving steps every generation route shares, TGI's and OpenAI's alike.

Both route families (`tgi.server.routes.generate` and `tgi.server.openai`) admit a
request the same way (the concurrency check, then validation on a worker thread with
timed and counted refusals), wait for
non-streamed results the same way (the first failure or the client leaving cancels
them all), answer with the same timing headers, and stream through the same SSE
response with the same keep-alive comment. Those steps live here, so neither route
module is a library for the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Send

from tgi.errors import BackendUnavailable, GenerationError, InvalidRequest, Overloaded
from tgi.router.request import ErrorEvent, FinalEvent, GenerationRequest
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters
from tgi.server.access import note_final, note_validation
from tgi.server.schemas import ErrorResponse
from tgi.server.state import ServerState

__all__ = [
    "ERROR_RESPONSES",
    "KEEP_ALIVE",
    "EventStream",
    "check_capacity",
    "final_events",
    "on_validation_workers",
    "refuse_request",
    "response_headers",
    "token_offsets",
    "validate",
]

T = TypeVar("T")

# The error answers a generation route documents in its OpenAPI entry.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation Error"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
}

KEEP_ALIVE = ":\n\n"  # an SSE comment, what axum's KeepAlive sends

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- admission -------------------------------------------------------------------------


def check_capacity(state: ServerState, num_requests: int) -> None:
    """TGI takes a concurrency permit before validating: refuse at once when full."""
    stats = state.router.stats()
    if stats.queue_size + stats.batch_size + num_requests > state.config.max_concurrent_requests:
        state.metrics.request_failure.labels(err="overloaded").inc()
        raise Overloaded("Model is overloaded")


def refuse_request(state: ServerState, message: str) -> InvalidRequest:
    """Count a validation refusal in the metrics; returns the exception to raise."""
    state.metrics.request_failure.labels(err="validation").inc()
    return InvalidRequest(message)


async def on_validation_workers(state: ServerState, func: Callable[..., T], *args: Any) -> T:
    """`func(*args)` on one of the `--validation-workers` threads, waiting for a free one.
    Tokenizing and templating are CPU work: a 2 MB prompt takes seconds, which on the
    event loop would stall every stream and /health."""
    return await anyio.to_thread.run_sync(func, *args, limiter=state.validation_workers)


def token_offsets(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[dict[str, Any]]:
    """TGI's `SimpleToken`s of `text`: each id with its character offsets. CPU work, for
    a validation worker (a fast tokenizer: the offsets come from its mapping)."""
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    return [
        {"id": token_id, "text": text[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(
            encoding["input_ids"], encoding["offset_mapping"], strict=True
        )
    ]


async def validate(
    state: ServerState, inputs: str, params: ClientParameters, *, add_special_tokens: bool = True
) -> GenerationRequest:
    """Validate and tokenize on a validation worker, with TGI's validation metrics;
    `add_special_tokens=False` for a chat-templated prompt."""
    started = time.perf_counter()
    validate_request = partial(state.validator.validate, add_special_tokens=add_special_tokens)
    try:
        request = await on_validation_workers(state, validate_request, inputs, params)
    except InvalidRequest as exc:
        raise refuse_request(state, str(exc)) from None
    validation_s = time.perf_counter() - started
    state.metrics.request_validation_duration.observe(validation_s)
    note_validation(validation_s)
    state.metrics.request_max_new_tokens.observe(request.stopping.max_new_tokens)
    return request


# ---- waiting for results ---------------------------------------------------------------


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as seen. Without this, a failure that nobody
    awaits (the client already left, or another request failed first) is logged as
    "exception was never retrieved", with a traceback, when it is collected."""
    if not future.cancelled():
        future.exception()


async def final_events(handles: list[RequestHandle], request: Request) -> list[FinalEvent]:
    """Wait for the end of non-streamed requests. The first failure cancels the others
    (TGI's `try_join_all`), and so does the client going away."""

    async def consume(handle: RequestHandle) -> FinalEvent:
        async for event in handle.events():
            if isinstance(event, FinalEvent):
                note_final(event)
                return event
            if isinstance(event, ErrorEvent):
                if event.error_type == "unhealthy":  # the engine died: TGI's 503
                    raise BackendUnavailable(event.message)
                raise GenerationError(event.message)
        raise GenerationError("Incomplete generation")

    results = [asyncio.ensure_future(consume(handle)) for handle in handles]
    for result in results:
        result.add_done_callback(_retrieve)
    disconnect: asyncio.Future[Any] = asyncio.ensure_future(_wait_for_disconnect(request))
    finished = False
    try:
        waiting: set[asyncio.Future[Any]] = {*results, disconnect}
        while not disconnect.done():
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for result in results:
                if result in done and result.exception() is not None:
                    raise result.exception()  # type: ignore[misc]
            if all(result.done() for result in results):
                finished = True
                return [result.result() for result in results]
        raise GenerationError("client disconnected")
    finally:
        disconnect.cancel()
        if not finished:  # a failure, the client leaving, or this task cancelled
            for result in results:
                result.cancel()
            for handle in handles:
                handle.cancel()


def response_headers(state: ServerState, event: FinalEvent, started: float) -> dict[str, str]:
    """TGI's timing headers on a non-streamed answer."""
    total_s = time.perf_counter() - started
    per_token_s = event.inference_s / max(event.generated_tokens, 1)
    return {
        "x-compute-type": state.model.device_type,
        "x-compute-time": str(total_s),
        "x-total-time": str(int(total_s * 1000)),
        "x-queue-time": str(int(event.queued_s * 1000)),
        "x-inference-time": str(int(event.inference_s * 1000)),
        "x-time-per-token": str(int(per_token_s * 1000)),
        "x-prompt-tokens": str(event.input_length),
        "x-generated-tokens": str(event.generated_tokens),
    }


# ---- streaming -------------------------------------------------------------------------


class EventStream(StreamingResponse):
    """An SSE response that cancels its request however the stream ends.

    Starlette stops iterating a body whose client went away without closing the
    generator (that waits for garbage collection), so the cancel is made here, at once.
    """

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            if self._on_close is not None:
                self._on_close()  # a no-op when the request finished
