"""Start-up, in the order that fails fast: settings, backend, model, weights, warmup.

Everything that can reject a configuration (backend selection, the backend's own
checks, token limits) runs before any weight loads, so a bad flag costs a second,
not a model load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tgi.backend.contract import Backend, Batching, Capabilities, KVCapacity, KvLayout, Limits
from tgi.backend.manager import SelectedBackend, select_backend
from tgi.config import ServeConfig, derive_limits
from tgi.errors import BackendError
from tgi.metrics import Metrics
from tgi.models.source import ModelFiles, inspect_model, materialize
from tgi.router.engine_thread import EngineThread
from tgi.router.policies import ContinuousPolicy, PagedPolicy, StaticSlotsPolicy
from tgi.router.scheduler import Router, RouterLimits, joins_immediately
from tgi.router.validation import ValidationLimits, Validator
from tgi.sampling.grammar import GrammarCompiler
from tgi.server.state import ServedModel, ServerState

__all__ = [
    "Prepared",
    "assemble_state",
    "build_state",
    "eos_token_ids",
    "prepare",
    "run_server",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    """The outcome of the checks that run before any weight loads."""

    config: ServeConfig
    selected: SelectedBackend
    model: ModelFiles


def prepare(config: ServeConfig) -> Prepared:
    """Select the backend, validate every setting, then fetch or convert the model."""
    selected = select_backend(config)
    info = inspect_model(config)
    config = selected.validate_config(config)
    config = derive_limits(config, info.max_position_embeddings)
    config.log_summary()
    files = materialize(info, config)
    return Prepared(config=config, selected=selected, model=files)


def eos_token_ids(tokenizer: Any, model: ModelFiles) -> frozenset[int]:
    """EOS ids from generation_config.json and the tokenizer, as generate() uses them."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        generation = GenerationConfig.from_pretrained(model.path)
        eos = generation.eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    except OSError:
        logger.info("no generation_config.json; EOS from the tokenizer only")
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def build_state(prepared: Prepared, metrics: Metrics | None = None) -> ServerState:
    """Load the tokenizer and weights, then assemble the server around them."""
    from transformers import AutoTokenizer

    config, files = prepared.config, prepared.model
    tokenizer = AutoTokenizer.from_pretrained(
        files.path, trust_remote_code=config.trust_remote_code
    )
    # Weights load, warm up and run on one thread (see tgi/router/engine_thread.py).
    engine_thread = EngineThread()
    backend = engine_thread.call(prepared.selected.create_backend, config, files)
    probe = prepared.selected.record.probe
    return assemble_state(
        config,
        backend,
        tokenizer,
        eos_token_ids=eos_token_ids(tokenizer, files),
        model_id=files.model_id,
        model_sha=files.sha,
        backend_name=prepared.selected.name,
        backend_version=probe.version if probe else "unknown",
        metrics=metrics,
        engine_thread=engine_thread,
    )


def assemble_state(
    config: ServeConfig,
    backend: Backend,
    tokenizer: Any,
    *,
    eos_token_ids: frozenset[int],
    model_id: str,
    model_sha: str | None = None,
    backend_name: str,
    backend_version: str,
    metrics: Metrics | None = None,
    engine_thread: EngineThread | None = None,
) -> ServerState:
    """Warm `backend` up and wire router, validator and metrics around it.

    `config` must have its token limits derived (`tgi.config.derive_limits`).
    """
    limits = _limits(config)
    engine_thread = engine_thread or EngineThread()
    capacity = engine_thread.call(backend.warmup, limits)
    batch_total = _batch_total_tokens(config, capacity)
    logger.info(
        "KV capacity: %d tokens (%d bytes per token); max_batch_total_tokens = %d",
        capacity.max_total_tokens,
        capacity.bytes_per_token,
        batch_total,
    )
    metrics = metrics or Metrics()
    router = Router(
        backend,
        tokenizer,
        limits=RouterLimits(
            max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
            max_batch_total_tokens=batch_total,
            max_batch_size=_batch_size(config, capacity),
            max_concurrent_requests=config.max_concurrent_requests,
        ),
        policy=_policy(config, backend.capabilities, capacity, batch_total),
        eos_token_ids=eos_token_ids,
        metrics=metrics,
        initial_kv=backend.kv_usage(),
        engine_thread=engine_thread,
    )
    validator = Validator(
        tokenizer,
        ValidationLimits(
            max_input_tokens=limits.max_input_tokens,
            max_total_tokens=limits.max_total_tokens,
            max_stop_sequences=config.max_stop_sequences,
            max_best_of=config.max_best_of,
            max_top_n_tokens=config.max_top_n_tokens,
            watermark_gamma=config.watermark_gamma,
            watermark_delta=config.watermark_delta,
        ),
        # built once here (about 0.5 s for a 50k vocabulary); None: grammar refused
        grammars=GrammarCompiler.from_hf_tokenizer(tokenizer, eos_token_ids),
    )
    dtype = getattr(backend, "dtype", None)
    served = ServedModel(
        model_id=model_id,
        model_sha=model_sha,
        model_dtype=str(dtype).removeprefix("torch.") if dtype is not None else "unknown",
        backend=backend_name,
        backend_version=backend_version,
        device_type=getattr(backend, "device_type", backend_name),
        capabilities=backend.capabilities,
        capacity=capacity,
    )
    return ServerState(config, served, router, validator, tokenizer, metrics)


def _policy(
    config: ServeConfig,
    capabilities: Capabilities,
    capacity: KVCapacity | None = None,
    batch_total: int | None = None,
) -> ContinuousPolicy | StaticSlotsPolicy | PagedPolicy:
    """The batching policy the backend's capabilities call for."""
    if capabilities.kv_layout is KvLayout.PAGED and capabilities.batching is Batching.CONTINUOUS:
        return _paged_policy(config, capabilities, capacity, batch_total)
    if capabilities.batching is Batching.STATIC:
        policy = StaticSlotsPolicy.from_capabilities(
            capabilities,
            waiting_served_ratio=config.waiting_served_ratio,
            max_waiting_tokens=config.max_waiting_tokens,
        )
        logger.info(
            "batching: %d static slots of %d tokens, %s",
            policy.num_slots,
            policy.max_length,
            "rebuilding every slot's KV at each prefill"
            if policy.rebuild
            else "new rows inserted into free slots",
        )
        return policy
    return ContinuousPolicy(
        waiting_served_ratio=config.waiting_served_ratio,
        max_waiting_tokens=config.max_waiting_tokens,
        join_immediately=joins_immediately(capabilities),
    )


def _paged_policy(
    config: ServeConfig,
    capabilities: Capabilities,
    capacity: KVCapacity | None,
    batch_total: int | None,
) -> PagedPolicy:
    """Blocks for the router's allocator: warmup's pool, capped by max_batch_total_tokens."""
    block_size = capabilities.block_size
    if capacity is None or not capacity.num_blocks or not block_size:
        raise BackendError(
            "a paged backend must report block_size in its capabilities and num_blocks "
            f"from warmup; it reported {capabilities} and {capacity}"
        )
    num_blocks = capacity.num_blocks
    if batch_total is not None:
        num_blocks = min(num_blocks, batch_total // block_size)
    max_total = config.max_total_tokens or 0
    if num_blocks * block_size < max_total:
        raise BackendError(
            f"{num_blocks} KV blocks of {block_size} tokens cannot hold one sequence of "
            f"max_total_tokens={max_total}; raise --max-batch-total-tokens or lower "
            "--max-total-tokens"
        )
    speculate = config.speculate or 0
    if speculate and not capabilities.speculation:
        logger.warning("--speculate %d ignored: the backend cannot verify drafts", speculate)
    policy = PagedPolicy.from_capabilities(
        capabilities,
        num_blocks=num_blocks,
        prefix_caching=config.prefix_caching,
        speculate=speculate,
    )
    logger.info(
        "batching: paged, %d blocks of %d tokens; chunked prefill %s, prefix cache %s, "
        "speculation %s",
        num_blocks,
        block_size,
        "on" if policy.chunked_prefill else "off",
        "on" if policy.prefix_caching else "off",
        f"{policy.speculate} n-gram drafts" if policy.speculate else "off",
    )
    return policy


def _limits(config: ServeConfig) -> Limits:
    if config.max_input_tokens is None or config.max_total_tokens is None:
        raise BackendError("token limits must be derived before the backend warms up")
    if config.max_batch_prefill_tokens is None:
        raise BackendError("max_batch_prefill_tokens must be derived before warmup")
    return Limits(
        max_input_tokens=config.max_input_tokens,
        max_total_tokens=config.max_total_tokens,
        max_batch_prefill_tokens=config.max_batch_prefill_tokens,
        max_batch_total_tokens=config.max_batch_total_tokens,
        max_batch_size=config.max_batch_size,
    )


def _batch_total_tokens(config: ServeConfig, capacity: KVCapacity) -> int:
    """The KV budget the router admits against: the flag, never more than what fits."""
    if config.max_batch_total_tokens is None:
        return capacity.max_total_tokens
    if config.max_batch_total_tokens > capacity.max_total_tokens:
        raise BackendError(
            f"--max-batch-total-tokens {config.max_batch_total_tokens} "
            f"({config.source_of('max_batch_total_tokens')}) exceeds the "
            f"{capacity.max_total_tokens} tokens of KV the backend can hold; lower it or "
            "leave it unset to use what warmup measured"
        )
    return config.max_batch_total_tokens


def _batch_size(config: ServeConfig, capacity: KVCapacity) -> int | None:
    sizes = [size for size in (config.max_batch_size, capacity.max_sequences) if size]
    return min(sizes) if sizes else None


def run_server(config: ServeConfig) -> None:
    """`tgi serve`: prepare, build, and serve HTTP until interrupted."""
    import uvicorn

    from tgi.server.app import create_app

    state = build_state(prepare(config))
    app = create_app(state)
    logger.info(
        "serving %s on http://%s:%d with backend %s",
        state.model.model_id,
        state.config.hostname,
        state.config.port,
        state.model.backend,
    )
    uvicorn.run(
        app,
        host=state.config.hostname,
        port=state.config.port,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
