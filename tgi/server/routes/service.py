"""Service routes: /info, /health, /metrics and /tokenize."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from tgi import __version__
from tgi.errors import BackendUnavailable, InvalidRequest
from tgi.metrics import CONTENT_TYPE, exposition
from tgi.server.process import resident_memory_bytes
from tgi.server.schemas import ErrorResponse, GenerateRequest, SimpleToken
from tgi.server.serving import on_validation_workers, token_offsets
from tgi.server.state import ServerState, get_state

__all__ = ["router"]

router = APIRouter(tags=["Text Generation Inference"])


@router.get("/info")
async def info(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """TGI's Info fields, then the backend's name, capabilities and live KV use."""
    config, model = state.config, state.model
    stats = state.router.stats()
    engine = state.router.engine.description
    return {
        "model_id": model.model_id,
        "model_sha": model.model_sha,
        "model_dtype": model.model_dtype,
        "model_device_type": model.device_type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": config.max_concurrent_requests,
        "max_best_of": config.max_best_of,
        "max_stop_sequences": config.max_stop_sequences,
        "max_input_tokens": config.max_input_tokens,
        "max_total_tokens": config.max_total_tokens,
        "validation_workers": config.validation_workers,
        "max_client_batch_size": config.max_client_batch_size,
        "waiting_served_ratio": config.waiting_served_ratio,
        "max_batch_total_tokens": model.capacity.total_tokens,
        "max_batch_prefill_tokens": config.max_batch_prefill_tokens,
        "max_waiting_tokens": config.max_waiting_tokens,
        "max_batch_size": config.max_batch_size,
        "router": "text-generation-router",
        "version": __version__,
        "sha": None,
        "docker_label": config.environ.get("DOCKER_LABEL"),
        "backend": model.backend,
        "backend_version": model.backend_version,
        "backend_capabilities": _jsonable(asdict(model.capabilities)),
        "backend_step_constraints": _jsonable(asdict(model.constraints)),
        "engine": {
            "placement": engine.placement,  # "process": a worker; "thread": in this process
            "pid": engine.pid,
            "healthy": state.router.healthy,
            "restarts": state.router.restarts,
            "num_shard": config.num_shard,  # ranks the model is split over
            "dtype_reason": engine.dtype_reason,  # how the backend chose model_dtype
            "details": engine.details,  # the backend's own: attention, kernels, graphs
        },
        "batch": {
            "queue_size": stats.queue_size,
            "current_size": stats.batch_size,
            "reserved_tokens": stats.reserved_tokens,
            "kv_live_sequences": len(stats.kv.seq_ids),
            "kv_used_tokens": stats.kv.used_tokens,
            "kv_capacity_tokens": stats.kv.capacity_tokens,
            "kv_bytes_per_token": model.capacity.bytes_per_token,
        },
        "memory": {
            "kv_bytes_per_token": model.capacity.bytes_per_token,
            "kv_capacity_bytes": model.capacity.bytes_per_token * model.capacity.total_tokens,
            "kv_block_size": model.capacity.block_size,
            "kv_num_blocks": model.capacity.num_blocks,
            "process_resident_bytes": resident_memory_bytes(),
            "engine_resident_bytes": resident_memory_bytes(engine.pid)
            if engine.placement == "process"
            else None,
        },
    }


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """Enums as their values, sets as sorted lists."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        out[key] = getattr(value, "value", value)
    return out


@router.get(
    "/health",
    response_class=Response,  # no media type: the 200 documents no body, as TGI's does
    responses={
        200: {"description": "Everything is working fine"},
        503: {"model": ErrorResponse, "description": "Text generation inference is down"},
    },
)
async def health(state: ServerState = Depends(get_state)) -> Response:
    """Cheap while healthy; after a failure, a real one-token forward decides. TGI's
    answers: an empty 200 (no body, no content type), or a 503 with its error body."""
    if not state.router.healthy:
        try:
            await state.router.check_health()
        except BackendUnavailable:
            return JSONResponse(
                status_code=503, content={"error": "unhealthy", "error_type": "healthcheck"}
            )
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus text format, with TGI's metric names (see `tgi.metrics.exposition`)."""
    return Response(exposition(state.metrics.registry), media_type=CONTENT_TYPE)


@router.post(
    "/tokenize", response_model=list[SimpleToken], responses={404: {"model": ErrorResponse}}
)
async def tokenize(body: GenerateRequest, state: ServerState = Depends(get_state)) -> Response:
    """The prompt's tokens with their character offsets."""
    if not getattr(state.tokenizer, "is_fast", False):
        return JSONResponse(status_code=404, content={"error": "No fast tokenizer available"})
    if not body.inputs:
        raise InvalidRequest("`inputs` cannot be empty")

    def answer() -> JSONResponse:  # the body is rendered on the worker too
        return JSONResponse(token_offsets(state.tokenizer, body.inputs, add_special_tokens=True))

    return await on_validation_workers(state, answer)
