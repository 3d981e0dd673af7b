"""`tgi`: serve a model, list backend plugins, show the effective configuration."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer

from tgi import __version__
from tgi.bench.cli import bench_app
from tgi.config import ServeConfig, env_help, resolve_config, snapshot_environ
from tgi.errors import TgiError

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="A Text Generation Inference compatible server on pluggable hardware backends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _opt(name: str, *flags: str) -> Any:
    return typer.Option(*flags, help=env_help(name), show_default=False)


def _config(values: dict[str, Any]) -> ServeConfig:
    try:
        return resolve_config(values, snapshot_environ())
    except TgiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


ModelId = Annotated[str | None, _opt("model_id", "--model-id")]
Revision = Annotated[str | None, _opt("revision", "--revision")]
Dtype = Annotated[str | None, _opt("dtype", "--dtype")]
BackendName = Annotated[str | None, _opt("backend", "--backend")]
Hostname = Annotated[str | None, _opt("hostname", "--hostname")]
Port = Annotated[int | None, _opt("port", "--port", "-p")]
MaxInput = Annotated[
    int | None, _opt("max_input_tokens", "--max-input-tokens", "--max-input-length")
]
MaxTotal = Annotated[int | None, _opt("max_total_tokens", "--max-total-tokens")]
MaxPrefill = Annotated[int | None, _opt("max_batch_prefill_tokens", "--max-batch-prefill-tokens")]
MaxBatchTotal = Annotated[int | None, _opt("max_batch_total_tokens", "--max-batch-total-tokens")]
MaxBatchSize = Annotated[int | None, _opt("max_batch_size", "--max-batch-size")]
MaxConcurrent = Annotated[int | None, _opt("max_concurrent_requests", "--max-concurrent-requests")]
MaxBestOf = Annotated[int | None, _opt("max_best_of", "--max-best-of")]
MaxStop = Annotated[int | None, _opt("max_stop_sequences", "--max-stop-sequences")]
MaxTopN = Annotated[int | None, _opt("max_top_n_tokens", "--max-top-n-tokens")]
MaxClientBatch = Annotated[int | None, _opt("max_client_batch_size", "--max-client-batch-size")]
WaitingRatio = Annotated[float | None, _opt("waiting_served_ratio", "--waiting-served-ratio")]
MaxWaiting = Annotated[int | None, _opt("max_waiting_tokens", "--max-waiting-tokens")]
Workers = Annotated[int | None, _opt("validation_workers", "--validation-workers")]
PayloadLimit = Annotated[int | None, _opt("payload_limit", "--payload-limit")]
JsonOutput = Annotated[bool | None, _opt("json_output", "--json-output/--no-json-output")]
TrustRemote = Annotated[
    bool | None, _opt("trust_remote_code", "--trust-remote-code/--no-trust-remote-code")
]
HubCache = Annotated[str | None, _opt("huggingface_hub_cache", "--huggingface-hub-cache")]
CacheDir = Annotated[str | None, _opt("cache_dir", "--cache-dir")]
CpuThreads = Annotated[int | None, _opt("cpu_threads", "--cpu-threads")]
Quantize = Annotated[str | None, _opt("quantize", "--quantize")]
Speculate = Annotated[int | None, _opt("speculate", "--speculate")]
KvCacheDtype = Annotated[str | None, _opt("kv_cache_dtype", "--kv-cache-dtype")]
KvCacheMemory = Annotated[str | None, _opt("kv_cache_memory", "--kv-cache-memory")]
PrefixCaching = Annotated[
    bool | None, _opt("prefix_caching", "--prefix-caching/--no-prefix-caching")
]
OverlapSteps = Annotated[bool | None, _opt("overlap_steps", "--overlap-steps/--no-overlap-steps")]
ShutdownTimeout = Annotated[float | None, _opt("shutdown_timeout", "--shutdown-timeout")]
EngineProcess = Annotated[
    bool | None, _opt("engine_process", "--engine-process/--no-engine-process")
]
EngineHugePages = Annotated[
    bool | None, _opt("engine_huge_pages", "--engine-huge-pages/--no-engine-huge-pages")
]
EngineStepTimeout = Annotated[float | None, _opt("engine_step_timeout", "--engine-step-timeout")]
MaxEngineRestarts = Annotated[int | None, _opt("max_engine_restarts", "--max-engine-restarts")]
NumShard = Annotated[int | None, _opt("num_shard", "--num-shard")]
Sharded = Annotated[str | None, _opt("sharded", "--sharded")]


def _at_least(name: str, flag: str, minimum: float) -> Any:
    return typer.Option(flag, help=env_help(name), show_default=False, min=minimum)


ApiKey = Annotated[str | None, _opt("api_key", "--api-key")]
ApiKeyExempt = Annotated[str | None, _opt("api_key_exempt", "--api-key-exempt")]
CorsAllowOrigin = Annotated[list[str] | None, _opt("cors_allow_origin", "--cors-allow-origin")]
CorsAllowCredentials = Annotated[
    bool | None,
    _opt("cors_allow_credentials", "--cors-allow-credentials/--no-cors-allow-credentials"),
]
CorsAllowMethods = Annotated[str | None, _opt("cors_allow_methods", "--cors-allow-methods")]
CorsAllowHeaders = Annotated[str | None, _opt("cors_allow_headers", "--cors-allow-headers")]
KeepAliveTimeout = Annotated[int | None, _at_least("keep_alive_timeout", "--keep-alive-timeout", 1)]
HeaderReadTimeout = Annotated[
    float | None, _at_least("header_read_timeout", "--header-read-timeout", 0.001)
]
MaxConnections = Annotated[int | None, _at_least("max_connections", "--max-connections", 1)]
OtlpEndpoint = Annotated[str | None, _opt("otlp_endpoint", "--otlp-endpoint")]
OtlpServiceName = Annotated[str | None, _opt("otlp_service_name", "--otlp-service-name")]
BackendOption = Annotated[
    list[str] | None,
    typer.Option(
        "--backend-option",
        metavar="KEY=VALUE",
        help="KEY=VALUE for a setting of the chosen backend's own (repeatable); `tgi "
        "backends --json` lists each backend's options. [env: TGI_<BACKEND>_<KEY>]",
        show_default=False,
    ),
]


# TGI launcher flags that name a GPU backend's own settings: given on the command line,
# they become that backend's options (`--backend-option cuda_graphs=...`), so a backend
# without them refuses them by name; their environment variables (CUDA_GRAPHS,
# CUDA_MEMORY_FRACTION) are read by the backends that declare them.
CudaGraphs = Annotated[
    str | None,
    typer.Option(
        "--cuda-graphs",
        help="Decode batch sizes captured as CUDA/HIP graphs, comma-separated; 0 for none "
        "(GPU backends: --backend-option cuda_graphs). [env: CUDA_GRAPHS]",
        show_default=False,
    ),
]
CudaMemoryFraction = Annotated[
    float | None,
    typer.Option(
        "--cuda-memory-fraction",
        help="Share of the GPU's memory tgi may use (GPU backends: --backend-option "
        "cuda_memory_fraction). [env: CUDA_MEMORY_FRACTION]",
        show_default=False,
    ),
]


def _serve_values(**values: Any) -> dict[str, Any]:
    return values


def _gpu_flags(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with --cuda-graphs / --cuda-memory-fraction moved into --backend-option."""
    options = list(values.pop("backend_option", None) or [])
    for name in ("cuda_graphs", "cuda_memory_fraction"):
        given = values.pop(name, None)
        if given is not None:
            options.append(f"{name}={given}")
    return {**values, "backend_option": options or None}


@app.command()
def serve(
    model_id: ModelId = None,
    revision: Revision = None,
    dtype: Dtype = None,
    backend: BackendName = None,
    hostname: Hostname = None,
    port: Port = None,
    max_input_tokens: MaxInput = None,
    max_total_tokens: MaxTotal = None,
    max_batch_prefill_tokens: MaxPrefill = None,
    max_batch_total_tokens: MaxBatchTotal = None,
    max_batch_size: MaxBatchSize = None,
    max_concurrent_requests: MaxConcurrent = None,
    max_best_of: MaxBestOf = None,
    max_stop_sequences: MaxStop = None,
    max_top_n_tokens: MaxTopN = None,
    max_client_batch_size: MaxClientBatch = None,
    waiting_served_ratio: WaitingRatio = None,
    max_waiting_tokens: MaxWaiting = None,
    validation_workers: Workers = None,
    payload_limit: PayloadLimit = None,
    json_output: JsonOutput = None,
    trust_remote_code: TrustRemote = None,
    huggingface_hub_cache: HubCache = None,
    cache_dir: CacheDir = None,
    cpu_threads: CpuThreads = None,
    quantize: Quantize = None,
    speculate: Speculate = None,
    kv_cache_dtype: KvCacheDtype = None,
    kv_cache_memory: KvCacheMemory = None,
    prefix_caching: PrefixCaching = None,
    overlap_steps: OverlapSteps = None,
    shutdown_timeout: ShutdownTimeout = None,
    engine_process: EngineProcess = None,
    engine_huge_pages: EngineHugePages = None,
    engine_step_timeout: EngineStepTimeout = None,
    max_engine_restarts: MaxEngineRestarts = None,
    num_shard: NumShard = None,
    sharded: Sharded = None,
    api_key: ApiKey = None,
    api_key_exempt: ApiKeyExempt = None,
    cors_allow_origin: CorsAllowOrigin = None,
    cors_allow_credentials: CorsAllowCredentials = None,
    cors_allow_methods: CorsAllowMethods = None,
    cors_allow_headers: CorsAllowHeaders = None,
    keep_alive_timeout: KeepAliveTimeout = None,
    header_read_timeout: HeaderReadTimeout = None,
    max_connections: MaxConnections = None,
    otlp_endpoint: OtlpEndpoint = None,
    otlp_service_name: OtlpServiceName = None,
    backend_option: BackendOption = None,
    cuda_graphs: CudaGraphs = None,
    cuda_memory_fraction: CudaMemoryFraction = None,
) -> None:
    """Serve a model over TGI's HTTP API (the embedded SmolLM2 when no --model-id)."""
    config = _config(_gpu_flags(dict(locals())))
    from tgi.parallel.env import rank_environment

    job = rank_environment(config.environ)
    if job is not None and job.rank != 0:
        # under torchrun: this process is the engine worker of its rank; rank 0's
        # process serves HTTP and tells it what to load
        from tgi.engine.worker.serve import serve_follower

        raise typer.Exit(serve_follower(config.environ))
    from tgi.launcher import run_server
    from tgi.logs import setup_logging

    setup_logging(config.json_output)
    logger.info("tgi %s starting", __version__)
    from tgi.launcher import EXIT_ENGINE_FAILED, EngineFailed

    try:
        run_server(config)
    except EngineFailed as exc:
        logger.critical("stopped: %s", exc)
        raise typer.Exit(EXIT_ENGINE_FAILED) from exc
    except TgiError as exc:
        logger.error("%s", exc)
        raise typer.Exit(1) from exc


@app.command()
def backends(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the backend plugins found, whether each can run here, and why not."""
    from tgi.backend.listing import backends_json, backends_table
    from tgi.backend.manager import discover

    logging.basicConfig(level=logging.ERROR)
    records = discover(snapshot_environ())
    typer.echo(backends_json(records) if as_json else backends_table(records))


@app.command("config")
def show_config(
    model_id: ModelId = None,
    backend: BackendName = None,
    max_input_tokens: MaxInput = None,
    max_total_tokens: MaxTotal = None,
    max_batch_prefill_tokens: MaxPrefill = None,
    max_batch_total_tokens: MaxBatchTotal = None,
    max_batch_size: MaxBatchSize = None,
    backend_option: BackendOption = None,
) -> None:
    """Print the effective settings and where each came from, loading no weights."""
    config = _config(dict(locals()))
    from tgi.backend.manager import select_backend
    from tgi.config import SETTINGS, derive_limits
    from tgi.models.source import inspect_model

    try:
        selected = select_backend(config)
        info = inspect_model(config)
        config = derive_limits(selected.validate_config(config), info.max_position_embeddings)
    except TgiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    rows = {
        s.name: {"value": getattr(config, s.name), "source": config.source_of(s.name)}
        for s in SETTINGS
    }
    rows["backend"]["value"] = selected.name
    for name, value in config.backend_options.items():
        key = f"backend_option.{name}"
        rows[key] = {"value": value, "source": config.source_of(key)}
    typer.echo(json.dumps(rows, indent=2))


@app.command()
def version() -> None:
    """Print tgi's version."""
    typer.echo(__version__)


app.add_typer(bench_app, name="bench")

if __name__ == "__main__":
    app()
