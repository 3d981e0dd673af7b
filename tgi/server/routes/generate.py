"""TGI's generation routes: /generate, /generate_stream and the compat route `POST /`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tgi.errors import GenerationError
from tgi.router.request import ErrorEvent, FinalEvent, GenerationRequest
from tgi.router.scheduler import RequestHandle
from tgi.server.schemas import (
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    StreamResponse,
)
from tgi.server.state import ServerState, get_state

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Text Generation Inference"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation Error"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
}


async def _submit(state: ServerState, body: GenerateRequest) -> RequestHandle:
    state.metrics.request_count.inc()
    params = body.parameters.to_client_parameters()
    try:
        request: GenerationRequest = await run_in_threadpool(
            state.validator.validate, body.inputs, params
        )
    except Exception:
        state.metrics.request_failure.labels(err="validation").inc()
        raise
    return state.router.submit(request)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _final_event(handle: RequestHandle, request: Request) -> FinalEvent:
    """Wait for the end of a non-streamed request; cancel it if the client leaves."""

    async def consume() -> FinalEvent:
        async for event in handle.events():
            if isinstance(event, FinalEvent):
                return event
            if isinstance(event, ErrorEvent):
                raise GenerationError(event.message)
        raise GenerationError("Incomplete generation")

    result = asyncio.ensure_future(consume())
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not result.done():
        result.cancel()
        handle.cancel()
        raise GenerationError("client disconnected")
    return result.result()


async def _generate_body(
    body: GenerateRequest, request: Request, state: ServerState
) -> dict[str, object]:
    handle = await _submit(state, body)
    event = await _final_event(handle, request)
    response = GenerateResponse(generated_text=event.generated_text)
    if body.parameters.details:
        response.details = Details.from_event(event)
        return response.model_dump(mode="json")
    return response.model_dump(mode="json", exclude={"details"})


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(
    body: GenerateRequest, request: Request, state: ServerState = Depends(get_state)
) -> JSONResponse:
    """Generate tokens for one prompt and return them at once."""
    return JSONResponse(await _generate_body(body, request, state))


@router.post("/generate_stream", responses=_ERRORS, response_class=StreamingResponse)
async def generate_stream(
    body: GenerateRequest, state: ServerState = Depends(get_state)
) -> StreamingResponse:
    """Generate tokens as Server-Sent Events, one `data:` event per token."""
    handle = await _submit(state, body)
    return StreamingResponse(
        _sse(handle, details=body.parameters.details),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(handle: RequestHandle, *, details: bool) -> AsyncIterator[str]:
    try:
        async for event in handle.events():
            if isinstance(event, ErrorEvent):
                body = ErrorResponse(error=event.message, error_type=event.error_type)
                yield f"data: {body.model_dump_json()}\n\n"
                return
            response = StreamResponse.from_event(event, details=details)
            yield f"data: {response.model_dump_json()}\n\n"
    finally:
        handle.cancel()  # a no-op when finished; frees KV when the client went away


@router.post("/", responses=_ERRORS, response_model=None)
async def compat_generate(
    body: CompatGenerateRequest, request: Request, state: ServerState = Depends(get_state)
) -> StreamingResponse | JSONResponse:
    """TGI's compat route: streams when `stream` is true, else a one-element list."""
    if body.stream:
        return await generate_stream(body, state)
    return JSONResponse([await _generate_body(body, request, state)])
