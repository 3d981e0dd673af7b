"""The OpenAI-compatible routes (/v1/chat/completions, /v1/completions, /v1/models) and
TGI's /chat_tokenize and SageMaker /invocations, which dispatch to the same handlers.

Errors on /v1 come back OpenAI-shaped (`OpenAIRoute`); /chat_tokenize and /invocations
keep TGI's `{error, error_type}`, as TGI's router answers them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from tgi.errors import InvalidRequest, TgiError
from tgi.server.openai.chat import ChunkWriter, chat_completion, chat_stream, prepare_chat
from tgi.server.openai.chat_template import render_chat
from tgi.server.openai.common import Identity, submit_all
from tgi.server.openai.completions import (
    check_prompts,
    completion,
    completion_parameters,
    completion_stream,
)
from tgi.server.openai.errors import OpenAIRoute, openai_error, tgi_error
from tgi.server.openai.schemas import ChatRequest, CompletionRequest
from tgi.server.openai.tools import DEFAULT_TOOL_PROMPT, tool_grammar
from tgi.server.routes.generate import compat_generate
from tgi.server.schemas import CompatGenerateRequest
from tgi.server.serving import (
    ERROR_RESPONSES,
    EventStream,
    final_events,
    on_validation_workers,
    response_headers,
    token_offsets,
)
from tgi.server.state import ServerState, get_state

__all__ = ["router", "v1_router"]

v1_router = APIRouter(tags=["OpenAI"], route_class=OpenAIRoute)
router = APIRouter(tags=["Text Generation Inference"])


def count_refusal(state: ServerState, exc: TgiError) -> TgiError:
    """Count a refused request in the metrics; returns `exc` to raise."""
    if isinstance(exc, InvalidRequest):
        state.metrics.request_failure.labels(err="validation").inc()
    return exc


# ---- chat ----------------------------------------------------------------------------


async def _chat(
    body: ChatRequest, request: Request, state: ServerState, *, openai_shape: bool
) -> Response:
    started = time.perf_counter()
    state.metrics.request_count.inc()
    try:
        prepared = await on_validation_workers(state, prepare_chat, body, state.tokenizer)
    except TgiError as exc:
        raise count_refusal(state, exc) from None
    (handle,) = await submit_all(
        state, [prepared.inputs], prepared.params, add_special_tokens=False
    )
    identity = Identity("chatcmpl", state, body.model)
    logprobs = bool(body.logprobs)
    if body.stream:
        writer = ChunkWriter(identity, logprobs=logprobs, include_usage=body.include_usage)
        stream = chat_stream(
            handle,
            writer,
            tools=prepared.tools,
            keep_alive_s=state.config.sse_keep_alive_s,
            openai_shape=openai_shape,
        )
        return EventStream(stream, on_close=handle.cancel)
    (event,) = await final_events([handle], request)
    body_out = chat_completion(identity, event, tools=prepared.tools, logprobs=logprobs)
    return JSONResponse(body_out, headers=response_headers(state, event, started))


@v1_router.post("/v1/chat/completions", responses=ERROR_RESPONSES, response_model=None)
async def chat_completions(
    body: ChatRequest, request: Request, state: ServerState = Depends(get_state)
) -> Response:
    """OpenAI's chat completions, streamed as `chat.completion.chunk` events when asked."""
    return await _chat(body, request, state, openai_shape=True)


# ---- completions ---------------------------------------------------------------------


async def _completions(
    body: CompletionRequest, request: Request, state: ServerState, *, openai_shape: bool
) -> Response:
    state.metrics.request_count.inc()
    try:
        prompts = check_prompts(body, state.config.max_client_batch_size)
        params = completion_parameters(body)
    except TgiError as exc:
        raise count_refusal(state, exc) from None
    handles = await submit_all(state, prompts, params)
    identity = Identity("cmpl", state, body.model)
    logprobs = body.logprobs is not None
    if body.stream:
        stream = completion_stream(
            handles,
            identity,
            prompts,
            echo=body.echo,
            logprobs=logprobs,
            include_usage=body.include_usage,
            keep_alive_s=state.config.sse_keep_alive_s,
            openai_shape=openai_shape,
        )

        def cancel() -> None:
            for handle in handles:
                handle.cancel()

        return EventStream(stream, on_close=cancel)
    events = await final_events(handles, request)
    return JSONResponse(completion(identity, events, prompts, logprobs=logprobs))


@v1_router.post("/v1/completions", responses=ERROR_RESPONSES, response_model=None)
async def completions(
    body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> Response:
    """OpenAI's (legacy) completions, for one prompt or a list of them."""
    return await _completions(body, request, state, openai_shape=True)


# ---- models --------------------------------------------------------------------------


def _model_info(state: ServerState) -> dict[str, Any]:
    model_id = state.model.model_id
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": model_id}


@v1_router.get("/v1/models", response_model=None)
async def models(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """TGI's `ModelInfo` of the served model, plus OpenAI's list shape (`data`) so the
    SDK's `models.list()` finds it too."""
    info = _model_info(state)
    return {**info, "data": [info]}


@v1_router.get("/v1/models/{model_id:path}", response_model=None)
async def model(model_id: str, state: ServerState = Depends(get_state)) -> Response:
    """The served model's `ModelInfo`; 404 for any other id."""
    if model_id != state.model.model_id:
        body = openai_error(f"model `{model_id}` is not served here", "not_found")
        return JSONResponse(status_code=404, content=body)
    return JSONResponse(_model_info(state))


# ---- /chat_tokenize ------------------------------------------------------------------


@router.post("/chat_tokenize", response_model=None)
async def chat_tokenize(body: ChatRequest, state: ServerState = Depends(get_state)) -> Response:
    """TGI's chat tokenizer: the templated text (tools included) and its tokens."""
    if not getattr(state.tokenizer, "is_fast", False):
        return JSONResponse(status_code=404, content={"error": "No fast tokenizer available"})
    return await on_validation_workers(state, _chat_tokenize, body, state.tokenizer)


def _chat_tokenize(body: ChatRequest, tokenizer: Any) -> JSONResponse:
    """Template and tokenize, and render the answer: CPU work, for a validation worker."""
    try:
        tools = tool_grammar(body.tools, body.tool_choice)
        text = render_chat(
            tokenizer,
            body.messages,
            tools=() if tools is None else tools.tools,
            tool_prompt=body.tool_prompt or DEFAULT_TOOL_PROMPT,
        )
    except TgiError as exc:
        status, content = tgi_error(exc)
        return JSONResponse(status_code=status, content=content)
    tokens = token_offsets(tokenizer, text, add_special_tokens=False)
    return JSONResponse({"tokenize_response": tokens, "templated_text": text})


# ---- /invocations --------------------------------------------------------------------


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            location = ".".join(str(item) for item in error.get("loc", ()))
            parts.append(f"{location}: {error['msg']}" if location else error["msg"])
        raise InvalidRequest("; ".join(parts)) from None


@router.post("/invocations", responses=ERROR_RESPONSES, response_model=None)
async def invocations(request: Request, state: ServerState = Depends(get_state)) -> Response:
    """SageMaker's entry point (TGI's `sagemaker_compatibility`): a body with `messages`
    is a chat, one with `prompt` a completion, anything else TGI's `POST /`."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested too deep
        return JSONResponse(
            status_code=400,
            content={
                "error": f"Failed to parse the request body as JSON: {exc}",
                "error_type": "validation",
            },
        )
    try:
        if not isinstance(data, dict):
            raise InvalidRequest("the request body must be a JSON object")
        if "messages" in data:
            return await _chat(_parse(ChatRequest, data), request, state, openai_shape=False)
        if "prompt" in data:
            return await _completions(
                _parse(CompletionRequest, data), request, state, openai_shape=False
            )
        body = _parse(CompatGenerateRequest, data)
        response: StreamingResponse | JSONResponse = await compat_generate(body, request, state)
        return response
    except TgiError as exc:
        status, content = tgi_error(exc)
        return JSONResponse(status_code=status, content=content)
