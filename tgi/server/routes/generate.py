"""TGI's generation routes: /generate, /generate_stream and the compat route `POST /`.

What happens in which order follows TGI's router (router/src/server.rs and
router/src/infer/mod.rs): count the request, refuse what a route cannot do
(`best_of` or `decoder_input_details` on a stream), refuse when
`max_concurrent_requests` are in flight, then validate. /generate answers errors with
their status code; /generate_stream always answers 200 and sends any error, early or
late, as a `data: {"error": ..., "error_type": ...}` event. The steps the OpenAI
routes share with these (admission, waiting for results, the SSE response) are in
`tgi.server.serving`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tgi.errors import InvalidRequest, Overloaded, TgiError
from tgi.router.request import ErrorEvent, FinalEvent
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters, Validator
from tgi.server.access import note_final
from tgi.server.errors import error_body
from tgi.server.schemas import (
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    StreamResponse,
)
from tgi.server.serving import (
    ERROR_RESPONSES,
    KEEP_ALIVE,
    EventStream,
    check_capacity,
    final_events,
    refuse_request,
    response_headers,
    validate,
)
from tgi.server.state import ServerState, get_state

__all__ = ["compat_generate", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Text Generation Inference"])


# ---- admission -------------------------------------------------------------------------


async def _submit(state: ServerState, inputs: str, params: ClientParameters) -> RequestHandle:
    check_capacity(state, 1)
    request = await validate(state, inputs, params)
    return state.router.submit(request)


# ---- /generate -------------------------------------------------------------------------


async def _generate(
    body: GenerateRequest, request: Request, state: ServerState
) -> tuple[dict[str, Any], dict[str, str]]:
    started = time.perf_counter()
    state.metrics.request_count.inc()
    params = body.parameters.to_client_parameters()
    best_of = params.best_of
    others: list[FinalEvent] | None = None  # best_of's other sequences
    if best_of is not None and best_of > 1:
        event, others = await _generate_best_of(state, body.inputs, params, best_of, request)
    else:
        handle = await _submit(state, body.inputs, params)
        (event,) = await final_events([handle], request)
    response = GenerateResponse(generated_text=event.generated_text)
    if body.parameters.wants_details:
        response.details = Details.from_event(event, others)
    return response.model_dump(mode="json"), response_headers(state, event, started)


async def _generate_best_of(
    state: ServerState, inputs: str, params: ClientParameters, best_of: int, request: Request
) -> tuple[FinalEvent, list[FinalEvent]]:
    """TGI's `generate_best_of`: `best_of` sampled requests with their own seeds; the one
    with the highest mean token logprob wins, the others become `best_of_sequences`."""
    try:
        state.validator.check_best_of(best_of)
    except InvalidRequest as exc:
        raise refuse_request(state, str(exc)) from None
    check_capacity(state, best_of)
    validated = await validate(state, inputs, params)
    handles: list[RequestHandle] = []
    try:
        for index in range(best_of):
            seed = validated.sampling.seed if index == 0 else random.getrandbits(63)
            sampling = dataclasses.replace(validated.sampling, seed=seed)
            handles.append(state.router.submit(dataclasses.replace(validated, sampling=sampling)))
    except Overloaded:
        for handle in handles:
            handle.cancel()
        raise
    events = await final_events(handles, request)
    best = max(range(len(events)), key=lambda i: (events[i].mean_logprob, -i))
    return events[best], [event for i, event in enumerate(events) if i != best]


@router.post("/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
async def generate(
    body: GenerateRequest, request: Request, state: ServerState = Depends(get_state)
) -> JSONResponse:
    """Generate tokens for one prompt and return them at once."""
    content, headers = await _generate(body, request, state)
    return JSONResponse(content, headers=headers)


# ---- /generate_stream ------------------------------------------------------------------


@router.post("/generate_stream", responses=ERROR_RESPONSES, response_class=StreamingResponse)
async def generate_stream(
    body: GenerateRequest, state: ServerState = Depends(get_state)
) -> StreamingResponse:
    """Generate tokens as Server-Sent Events, one `data:` event per token."""
    state.metrics.request_count.inc()
    params = body.parameters.to_client_parameters()
    try:
        try:
            Validator.check_streamable(params)
        except InvalidRequest as exc:
            raise refuse_request(state, str(exc)) from None
        handle = await _submit(state, body.inputs, params)
    except TgiError as exc:
        return EventStream(_error_stream(exc))
    stream = _sse(handle, details=body.parameters.details, keep_alive_s=_keep_alive(state))
    return EventStream(stream, on_close=handle.cancel)


def _keep_alive(state: ServerState) -> float:
    return state.config.sse_keep_alive_s


def _error_event(status_body: tuple[int, dict[str, str]]) -> str:
    body = ErrorResponse(error=status_body[1]["error"], error_type=status_body[1]["error_type"])
    return f"data: {body.model_dump_json()}\n\n"


async def _error_stream(exc: TgiError) -> AsyncIterator[str]:
    yield _error_event(error_body(exc))


async def _sse(handle: RequestHandle, *, details: bool, keep_alive_s: float) -> AsyncIterator[str]:
    """One `data:` event per token; a comment after `keep_alive_s` of silence."""
    events = cast(AsyncGenerator[Any, None], handle.events())
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            # Never cancel the pending `anext` for a keep-alive: that would close the
            # event generator, which cancels the request. Wait on it again instead.
            pending = asyncio.ensure_future(anext(events))
            while not (await asyncio.wait({pending}, timeout=keep_alive_s))[0]:
                yield KEEP_ALIVE
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            if isinstance(event, ErrorEvent):
                body = ErrorResponse(error=event.message, error_type=event.error_type)
                yield f"data: {body.model_dump_json()}\n\n"
                return
            response = StreamResponse.from_event(event, details=details)
            yield f"data: {response.model_dump_json()}\n\n"
            if isinstance(event, FinalEvent):
                note_final(event)
                return
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the client left mid-wait: this closes the event generator
        else:
            await events.aclose()
        handle.cancel()  # a no-op when finished; frees KV when the client went away


# ---- POST / ----------------------------------------------------------------------------


@router.post("/", responses=ERROR_RESPONSES, response_model=None)
async def compat_generate(
    body: CompatGenerateRequest, request: Request, state: ServerState = Depends(get_state)
) -> StreamingResponse | JSONResponse:
    """TGI's compat route: streams when `stream` is true, else a one-element list.

    As in TGI, `return_full_text` defaults to true here for a text-generation model.
    """
    if body.parameters.return_full_text is None:
        body.parameters.return_full_text = True
    if body.stream:
        return await generate_stream(body, state)
    content, headers = await _generate(body, request, state)
    return JSONResponse([content], headers=headers)
