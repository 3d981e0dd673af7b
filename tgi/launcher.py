"""Start-up, in the order that fails fast: settings, backend, model, weights, warmup.

Everything that can reject a configuration (backend selection, the backend's own
checks, token limits) runs before any weight loads, so a bad flag costs a second,
not a model load.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tgi.backend.contract import (
    Backend,
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    Limits,
    WarmupReport,
)
from tgi.backend.manager import SelectedBackend, select_backend
from tgi.config import ServeConfig, derive_limits
from tgi.engine.local import LocalEngine
from tgi.engine.protocol import Engine
from tgi.engine.thread import EngineThread
from tgi.engine.worker.client import WorkerEngine
from tgi.engine.worker.messages import StartWorker
from tgi.errors import BackendError, ConfigError
from tgi.metrics import Metrics
from tgi.models.source import ModelFiles, inspect_model, materialize
from tgi.parallel.env import rank_environment
from tgi.router.policies import (
    ContinuousPolicy,
    PagedPolicy,
    PolicyLimits,
    SchedulingPolicy,
    StaticSlotsPolicy,
)
from tgi.router.router import Router, RouterLimits
from tgi.router.validation import BackendSampling, ValidationLimits, Validator
from tgi.sampling.grammar import GrammarCompiler
from tgi.server.state import ServedModel, ServerState

__all__ = [
    "EXIT_ENGINE_FAILED",
    "EngineFailed",
    "Prepared",
    "assemble_engine_state",
    "assemble_state",
    "build_state",
    "eos_token_ids",
    "prepare",
    "run_server",
    "worker_start",
]

logger = logging.getLogger(__name__)

EXIT_ENGINE_FAILED = 3  # `tgi serve`'s exit status when the engine worker kept dying


class EngineFailed(BackendError):
    """The engine worker died more often than --max-engine-restarts allows."""


# A backend's own policy for its capabilities, limits and warmup (None: the built-in one)
CustomPolicy = Callable[
    [ServeConfig, Capabilities, PolicyLimits, WarmupReport], SchedulingPolicy | None
]


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
    job = rank_environment(config.environ)
    if job is not None and job.world_size > 1 and selected.options.parallelism != "ranks":
        raise ConfigError(
            f"this process is one of WORLD_SIZE={job.world_size} ranks (torchrun), but backend "
            f"{selected.name!r} does not split a model over ranks (parallelism "
            f"{selected.options.parallelism!r}); run it as one process"
        )
    if config.num_shard > 1 and selected.options.parallelism == "ranks":
        _check_shards(config, files)
    return Prepared(config=config, selected=selected, model=files)


def _check_shards(config: ServeConfig, files: ModelFiles) -> None:
    """Refuse a shard count the model cannot split over, before any weight loads and
    without needing the ranks: `--num-shard` with the engine in this process, or a
    model whose heads, KV heads or MLP the count does not divide."""
    if not config.engine_process:
        raise ConfigError(
            f"--num-shard {config.num_shard} runs one engine worker per rank; it cannot be "
            f"combined with --no-engine-process ({config.source_of('engine_process')})"
        )
    from tgi.models.llama import ARCHITECTURES, LlamaSpec
    from tgi.parallel.sharding import check_shardable
    from tgi.weights import open_checkpoint

    if files.architecture not in ARCHITECTURES:
        return  # the backend names what it cannot shard when it loads
    hf_config, _ = open_checkpoint(files.path)
    check_shardable(LlamaSpec.from_hf(hf_config), config.num_shard, quantize=config.quantize)


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
    """Load the tokenizer, start the engine (a worker process unless
    `--no-engine-process`), then assemble the server around it."""
    from transformers import AutoTokenizer

    config, files = prepared.config, prepared.model
    tokenizer = AutoTokenizer.from_pretrained(
        files.path, trust_remote_code=config.trust_remote_code
    )
    eos = eos_token_ids(tokenizer, files)
    # built once here (about 0.5 s for a 50k vocabulary); None: grammar refused. A
    # worker compiles its own matchers from the grammars' source.
    grammars = GrammarCompiler.from_hf_tokenizer(tokenizer, eos)
    # Every engine call, from loading the weights on, goes through one thread (see
    # tgi/engine/thread.py); a worker process keeps its own single thread.
    engine_thread = EngineThread()
    engine: Engine
    if config.engine_process:
        start = worker_start(prepared, eos)
        job = rank_environment(config.environ)
        launched_by_torchrun = job is not None and job.world_size > 1
        engine = engine_thread.call(
            lambda: WorkerEngine.spawn(
                start,
                step_timeout_s=config.engine_step_timeout,
                external_ranks=launched_by_torchrun,
                huge_pages=config.engine_huge_pages,
            )
        )
    else:
        backend = engine_thread.call(prepared.selected.create_backend, config, files)
        engine = LocalEngine(backend, grammars, owns_backend=True)
    probe = prepared.selected.record.probe
    try:
        return assemble_engine_state(
            config,
            engine,
            tokenizer,
            grammars,
            eos_token_ids=eos,
            model_id=files.model_id,
            model_sha=files.sha,
            backend_name=prepared.selected.name,
            backend_version=probe.version if probe else "unknown",
            metrics=metrics,
            engine_thread=engine_thread,
            custom_policy=prepared.selected.scheduling_policy,
        )
    except BaseException:
        engine_thread.call(engine.close)  # no worker outlives a failed start-up
        engine_thread.shutdown()
        raise


def worker_start(prepared: Prepared, eos_token_ids: frozenset[int]) -> StartWorker:
    """What an engine worker needs to build the same backend as this process would;
    one worker per rank when the backend shards by ranks."""
    start = StartWorker.for_model(
        prepared.config.model_dump_json(), prepared.selected.name, prepared.model, eos_token_ids
    )
    if prepared.selected.options.parallelism == "ranks":
        start = dataclasses.replace(start, world_size=prepared.config.num_shard)
    return start


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
    custom_policy: CustomPolicy | None = None,
) -> ServerState:
    """The server around a backend object of this process (`LocalEngine`): what tests
    and embedders use. `assemble_engine_state` has the details."""
    grammars = GrammarCompiler.from_hf_tokenizer(tokenizer, eos_token_ids)
    return assemble_engine_state(
        config,
        LocalEngine(backend, grammars),
        tokenizer,
        grammars,
        eos_token_ids=eos_token_ids,
        model_id=model_id,
        model_sha=model_sha,
        backend_name=backend_name,
        backend_version=backend_version,
        metrics=metrics,
        engine_thread=engine_thread,
        custom_policy=custom_policy,
    )


def assemble_engine_state(
    config: ServeConfig,
    engine: Engine,
    tokenizer: Any,
    grammars: GrammarCompiler | None,
    *,
    eos_token_ids: frozenset[int],
    model_id: str,
    model_sha: str | None = None,
    backend_name: str,
    backend_version: str,
    metrics: Metrics | None = None,
    engine_thread: EngineThread | None = None,
    custom_policy: CustomPolicy | None = None,
) -> ServerState:
    """Warm `engine` up and wire router, validator and metrics around it.

    `custom_policy` may replace the built-in scheduling policy the backend's
    capabilities call for (the plugin's `tgi_scheduling_policy`, or a test's).
    `grammars` is the front process's compiler (validation refuses a bad grammar
    before it is queued; None refuses every grammar).

    `config` must have its token limits derived (`tgi.config.derive_limits`).
    """
    limits = _limits(config)
    engine_thread = engine_thread or EngineThread()
    described = engine.description
    capabilities = described.capabilities
    report: WarmupReport = engine_thread.call(engine.warmup, limits)
    capacity = report.kv
    batch_total = _batch_total_tokens(config, capacity)
    logger.info(
        "KV capacity: %d tokens (%d bytes per token); max_batch_total_tokens = %d; "
        "warmup took %.2f s",
        capacity.total_tokens,
        capacity.bytes_per_token,
        batch_total,
        report.seconds,
    )
    _check_constraints(config, capabilities, report)
    policy_limits = PolicyLimits(
        max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
        max_batch_total_tokens=batch_total,
        max_batch_size=_batch_size(config, capacity),
        waiting_served_ratio=config.waiting_served_ratio,
        max_waiting_tokens=config.max_waiting_tokens,
        constraints=report.constraints,
    )
    policy = None
    if custom_policy is not None:
        policy = custom_policy(config, capabilities, policy_limits, report)
    if policy is None:
        policy = _policy(config, capabilities, policy_limits, capacity)
    else:
        logger.info("batching: the backend's own policy %s", type(policy).__name__)
    metrics = metrics or Metrics()
    router = Router(
        engine,
        tokenizer,
        limits=RouterLimits(
            max_concurrent_requests=config.max_concurrent_requests,
            max_restarts=config.max_engine_restarts,
        ),
        policy=policy,
        eos_token_ids=eos_token_ids,
        metrics=metrics,
        initial_kv=engine_thread.call(engine.kv_usage),
        engine_thread=engine_thread,
        overlap=config.overlap_steps,
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
        grammars=grammars,
        backend=BackendSampling(backend_name, capabilities),
    )
    served = ServedModel(
        model_id=model_id,
        model_sha=model_sha,
        model_dtype=described.dtype or "unknown",
        backend=backend_name,
        backend_version=backend_version,
        device_type=described.device_type or backend_name,
        capabilities=capabilities,
        capacity=capacity,
        constraints=report.constraints,
    )
    return ServerState(config, served, router, validator, tokenizer, metrics)


def _policy(
    config: ServeConfig,
    capabilities: Capabilities,
    limits: PolicyLimits,
    capacity: KVCapacity | None = None,
) -> SchedulingPolicy:
    """The built-in scheduling policy the backend's capabilities call for."""
    if capabilities.kv_layout is KvLayout.PAGED and capabilities.batching is Batching.CONTINUOUS:
        return _paged_policy(config, capabilities, limits, capacity)
    if capabilities.batching is Batching.STATIC:
        static = StaticSlotsPolicy.from_capabilities(capabilities, limits)
        logger.info(
            "batching: %d static slots of %d tokens, %s",
            static.num_slots,
            static.max_length,
            "the backend rebuilds every slot's KV when a sequence joins"
            if static.rebuild
            else "new rows inserted into free slots",
        )
        return static
    return ContinuousPolicy.from_capabilities(capabilities, limits)


def _paged_policy(
    config: ServeConfig,
    capabilities: Capabilities,
    limits: PolicyLimits,
    capacity: KVCapacity | None,
) -> PagedPolicy:
    """Blocks for the policy's allocator: warmup's pool, capped by max_batch_total_tokens."""
    block_size = capabilities.block_size
    if capacity is None or not capacity.num_blocks or not block_size:
        raise BackendError(
            "a paged backend must report block_size in its capabilities and num_blocks "
            f"from warmup; it reported {capabilities} and {capacity}"
        )
    num_blocks = min(capacity.num_blocks, limits.max_batch_total_tokens // block_size)
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
        limits,
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


def _check_constraints(
    config: ServeConfig, capabilities: Capabilities, report: WarmupReport
) -> None:
    """Refuse limits the backend's hard step shapes can never serve."""
    longest = report.constraints.max_chunk
    max_input = config.max_input_tokens or 0
    if longest is not None and not capabilities.chunked_prefill and max_input > longest:
        raise BackendError(
            f"--max-input-tokens {max_input} ({config.source_of('max_input_tokens')}) is "
            f"longer than the longest prompt the backend compiled ({longest} tokens) and it "
            "cannot split prompts; lower --max-input-tokens"
        )


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
        return capacity.total_tokens
    if config.max_batch_total_tokens > capacity.total_tokens:
        raise BackendError(
            f"--max-batch-total-tokens {config.max_batch_total_tokens} "
            f"({config.source_of('max_batch_total_tokens')}) exceeds the "
            f"{capacity.total_tokens} tokens of KV the backend can hold; lower it or "
            "leave it unset to use what warmup measured"
        )
    return config.max_batch_total_tokens


def _batch_size(config: ServeConfig, capacity: KVCapacity) -> int | None:
    sizes = [size for size in (config.max_batch_size, capacity.max_sequences) if size]
    return min(sizes) if sizes else None


def run_server(config: ServeConfig) -> None:
    """`tgi serve`: check the port, prepare, build, and serve HTTP until a signal, then
    drain (`tgi.server.lifecycle`). Raises `EngineFailed` (exit status
    EXIT_ENGINE_FAILED) when the engine worker kept dying."""
    import uvicorn

    from tgi.server.app import create_app
    from tgi.server.connections import uvicorn_options
    from tgi.server.lifecycle import DrainingServer, check_port

    check_port(config.hostname, config.port)
    state = build_state(prepare(config))
    app = create_app(state)
    described = state.router.engine.description
    logger.info(
        "serving %s on http://%s:%d with backend %s (engine in %s %d)",
        state.model.model_id,
        state.config.hostname,
        state.config.port,
        state.model.backend,
        "worker process" if described.placement == "process" else "process",
        described.pid,
    )
    server = DrainingServer(
        uvicorn.Config(app, **uvicorn_options(state.config)),
        state.router,
        drain_timeout_s=state.config.shutdown_timeout,
    )

    def stop_serving(reason: str) -> None:
        server.should_exit = True

    state.router.on_fatal = stop_serving
    server.run()
    if state.router.fatal is not None:
        raise EngineFailed(state.router.fatal)
