"""The one typed configuration of a tgi server, and where each value came from.

NOTE: this is the only module that reads `os.environ`. Every launcher flag keeps the
environment variable TGI's launcher reads (users' scripts and images already set
them); settings of tgi's own take a `TGI_` prefix. Resolution order per setting:
command line, then environment, then a value derived from other settings or the
model, then the default. `ServeConfig.sources` records which one won, so start-up can
log it and a backend's validation can name it in an error.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict

from tgi.errors import ConfigError

if TYPE_CHECKING:
    from tgi.backend.hookspecs import BackendFlag

logger = logging.getLogger(__name__)

__all__ = [
    "DTYPE_CHOICES",
    "KV_CACHE_DTYPE_CHOICES",
    "QUANTIZE_CHOICES",
    "SETTINGS",
    "ServeConfig",
    "Setting",
    "backend_option_env",
    "derive_limits",
    "env_help",
    "parse_backend_option_args",
    "parse_bytes",
    "resolve_backend_options",
    "resolve_config",
    "snapshot_environ",
]

# NOTE: these are the spellings the core ACCEPTS (TGI's launcher's full sets, plus tgi's
# own int8/int4); whether a value RUNS is the chosen backend's call: each backend declares
# the subset it offers (`tgi_backend_options`), and selection rejects the rest, naming
# the backends that do offer it (`tgi.backend.manager.SelectedBackend.validate_config`).
Dtype = Literal["float32", "bfloat16", "float16"]
Quantize = Literal[
    "awq",
    "compressed-tensors",
    "eetq",
    "exl2",
    "gptq",
    "marlin",
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "fp8",
    "int8",  # tgi's own: weight-only int8 at load time
    "int4",  # tgi's own: weight-only int4 (grouped) at load time
]
KvCacheDtype = Literal["float32", "bfloat16", "float16", "fp8", "fp8_e4m3fn", "fp8_e5m2"]
DTYPE_CHOICES: tuple[str, ...] = get_args(Dtype)
QUANTIZE_CHOICES: tuple[str, ...] = get_args(Quantize)
KV_CACHE_DTYPE_CHOICES: tuple[str, ...] = get_args(KvCacheDtype)

# TGI caps its derived default context here to leave memory for more users.
DEFAULT_MAX_TOTAL_TOKENS_CAP = 4096


@dataclass(frozen=True, slots=True)
class Setting:
    """One launcher setting: its environment variables and how to parse them."""

    name: str
    env: tuple[str, ...]  # first one is the documented name; others are aliases
    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


_BYTE_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
    "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
    "tib": 2**40,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1000000' -> bytes. Raises ValueError on anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"expected a size like 2GiB, 512MB or 1000000, got {text!r}")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def _quantize(text: str) -> str:
    lowered = text.strip().lower().replace("_", "-")
    if lowered not in QUANTIZE_CHOICES:
        raise ValueError(f"expected one of {', '.join(QUANTIZE_CHOICES)}; got {text!r}")
    return lowered


_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
# vLLM spells the e4m3 variant without TGI's (and torch's) "fn" suffix.
_KV_CACHE_DTYPE_ALIASES = {
    **_DTYPE_ALIASES,
    "fp8": "fp8",  # the backend picks the fp8 format
    "fp8_e4m3fn": "fp8_e4m3fn",
    "fp8_e4m3": "fp8_e4m3fn",
    "fp8_e5m2": "fp8_e5m2",
}


def _dtype(text: str) -> str:
    try:
        return _DTYPE_ALIASES[text.strip().lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"expected one of {', '.join(DTYPE_CHOICES)}; got {text!r}") from None


def _kv_cache_dtype(text: str) -> str:
    try:
        return _KV_CACHE_DTYPE_ALIASES[text.strip().lower().removeprefix("torch.")]
    except KeyError:
        choices = ", ".join(KV_CACHE_DTYPE_CHOICES)
        raise ValueError(f"expected one of {choices}; got {text!r}") from None


class Secret(str):
    """A str that logs as `'***'`: `--api-key` is logged with every other setting at
    start-up (`ServeConfig.log_summary`), and log pipelines keep what they are sent."""

    def __repr__(self) -> str:
        return "'***'"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())


def _secret(text: str) -> Secret:
    if not text.strip():
        raise ValueError("expected a non-empty key")
    return Secret(text.strip())


def _names(text: str | Iterable[str]) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'); a repeated CLI flag's list is split the same way."""
    texts = [text] if isinstance(text, str) else list(text)
    return tuple(part.strip() for item in texts for part in item.split(",") if part.strip())


# a comma list setting: from the environment, or a repeatable (or comma-list) flag
Names = Annotated[tuple[str, ...], BeforeValidator(_names)]


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text.strip())
        if value <= 0:
            raise ValueError(f"must be positive, got {text!r}")
        return value

    return parse


def _otlp_endpoint(text: str) -> str:
    import importlib.util

    # checked here, before a model loads, rather than when the app is built
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ValueError("OpenTelemetry traces need the otel extra: pip install 'tgi-server[otel]'")
    return text.strip()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "model_id",
        ("MODEL_ID",),
        str,
        None,
        "Local directory, .gguf file or hub id; unset serves the embedded SmolLM2.",
    ),
    Setting("revision", ("REVISION",), str, None, "Hub revision of --model-id."),
    Setting(
        "dtype",
        ("DTYPE",),
        _dtype,
        None,
        "Compute dtype; unset lets the backend choose what its hardware runs fast.",
    ),
    Setting(
        "quantize",
        ("QUANTIZE",),
        _quantize,
        None,
        "Quantization: " + ", ".join(QUANTIZE_CHOICES) + " (the chosen backend runs a "
        "subset; `tgi backends --json` lists them); unset keeps the weights' dtype.",
    ),
    Setting(
        "speculate",
        ("SPECULATE",),
        int,
        None,
        "Draft tokens per step from n-gram speculation over each request's own history.",
    ),
    Setting(
        "kv_cache_dtype",
        ("KV_CACHE_DTYPE",),
        _kv_cache_dtype,
        None,
        "Storage dtype of the KV cache: " + ", ".join(KV_CACHE_DTYPE_CHOICES) + " (the "
        "chosen backend runs a subset); unset stores it in the compute dtype.",
    ),
    Setting(
        "kv_cache_memory",
        ("TGI_KV_CACHE_MEMORY",),
        parse_bytes,
        None,
        "Bytes given to the KV cache (e.g. 2GiB); unset: a share of free memory at warmup.",
    ),
    Setting(
        "prefix_caching",
        ("PREFIX_CACHING",),
        _bool,
        True,
        "Reuse the KV of block-aligned prompt prefixes seen before (paged backends).",
    ),
    Setting(
        "overlap_steps",
        ("TGI_OVERLAP_STEPS",),
        _bool,
        False,
        "Plan each step while the previous one runs (where no token value is needed).",
    ),
    Setting(
        "shutdown_timeout",
        ("TGI_SHUTDOWN_TIMEOUT",),
        float,
        25.0,
        "Seconds a SIGTERM or Ctrl-C lets running requests finish before they are ended "
        "(Kubernetes' default grace period is 30 s: raise both together).",
    ),
    Setting(
        "engine_process",
        ("TGI_ENGINE_PROCESS",),
        _bool,
        True,
        "Run the engine (backend + sampler) in a worker process that is restarted if it "
        "dies; off runs it on a thread of the HTTP process.",
    ),
    Setting(
        "engine_huge_pages",
        ("TGI_ENGINE_HUGE_PAGES",),
        _bool,
        True,
        "Start the engine worker with glibc's malloc asking for transparent huge pages "
        "(GLIBC_TUNABLES glibc.malloc.hugetlb=1, unless GLIBC_TUNABLES sets it): fewer TLB "
        "misses over the weights and the KV pool (10-14% off a CPU step, measured).",
    ),
    Setting(
        "engine_step_timeout",
        ("TGI_ENGINE_STEP_TIMEOUT",),
        float,
        600.0,
        "Seconds the engine worker may take over one step before it is presumed hung, "
        "killed and restarted.",
    ),
    Setting(
        "max_engine_restarts",
        ("TGI_MAX_ENGINE_RESTARTS",),
        int,
        3,
        "Engine worker restarts allowed within ten minutes; one more stops the server "
        "(exit status 3).",
    ),
    Setting(
        "num_shard",
        ("NUM_SHARD",),
        int,
        1,
        "Tensor-parallel ranks to split the model over (one worker process each); under "
        "torchrun, WORLD_SIZE.",
    ),
    Setting(
        "sharded",
        ("SHARDED",),
        _bool,
        None,
        "TGI's switch: true needs --num-shard above 1 (TGI would count the GPUs; tgi does "
        "not guess), false refuses it; unset follows --num-shard.",
    ),
    Setting(
        "backend",
        ("TGI_BACKEND",),
        str,
        None,
        "Backend plugin to use; unset picks the available one of highest priority.",
    ),
    Setting("hostname", ("HOSTNAME",), str, "0.0.0.0", "Address to listen on."),
    Setting("port", ("PORT",), int, 3000, "Port to listen on."),
    Setting(
        "max_input_tokens",
        ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"),
        int,
        None,
        "Longest prompt in tokens; default max_total_tokens - 1.",
    ),
    Setting(
        "max_total_tokens",
        ("MAX_TOTAL_TOKENS",),
        int,
        None,
        "Prompt plus generated tokens of one request; default from the model, capped.",
    ),
    Setting(
        "max_batch_prefill_tokens",
        ("MAX_BATCH_PREFILL_TOKENS",),
        int,
        None,
        "Prompt tokens in one prefill step; default max_input_tokens + 50.",
    ),
    Setting(
        "max_batch_total_tokens",
        ("MAX_BATCH_TOTAL_TOKENS",),
        int,
        None,
        "KV tokens across the running batch; default: what the backend's warmup measures.",
    ),
    Setting("max_batch_size", ("MAX_BATCH_SIZE",), int, None, "Rows in one batch."),
    Setting(
        "max_concurrent_requests",
        ("MAX_CONCURRENT_REQUESTS",),
        int,
        128,
        "Requests in flight before new ones get 429.",
    ),
    Setting("max_best_of", ("MAX_BEST_OF",), int, 2, "Largest `best_of` a client may ask."),
    Setting(
        "max_stop_sequences", ("MAX_STOP_SEQUENCES",), int, 4, "Most stop sequences in one request."
    ),
    Setting(
        "max_top_n_tokens",
        ("MAX_TOP_N_TOKENS",),
        int,
        5,
        "Largest `top_n_tokens` a client may ask.",
    ),
    Setting(
        "max_client_batch_size",
        ("MAX_CLIENT_BATCH_SIZE",),
        int,
        4,
        "Most inputs in one client request.",
    ),
    Setting(
        "waiting_served_ratio",
        ("WAITING_SERVED_RATIO",),
        float,
        1.2,
        "Waiting/running ratio above which waiting requests pause the batch for a prefill.",
    ),
    Setting(
        "max_waiting_tokens",
        ("MAX_WAITING_TOKENS",),
        int,
        20,
        "Decode steps after which waiting requests are forced into the batch.",
    ),
    Setting("validation_workers", ("VALIDATION_WORKERS",), int, 2, "Tokenizer worker threads."),
    Setting("payload_limit", ("PAYLOAD_LIMIT",), int, 2_000_000, "Largest request body in bytes."),
    Setting(
        "watermark_gamma",
        ("WATERMARK_GAMMA",),
        float,
        0.5,
        "Fraction of the vocabulary in the watermark's green list (`watermark: true`).",
    ),
    Setting(
        "watermark_delta",
        ("WATERMARK_DELTA",),
        float,
        2.0,
        "Logit bias the watermark adds to green tokens.",
    ),
    Setting(
        "sse_keep_alive_s",
        ("TGI_SSE_KEEP_ALIVE_S",),
        float,
        15.0,
        "Seconds of silence after which a token stream sends an SSE keep-alive comment.",
    ),
    Setting("json_output", ("JSON_OUTPUT",), _bool, False, "Log as JSON lines."),
    Setting(
        "trust_remote_code",
        ("TRUST_REMOTE_CODE",),
        _bool,
        False,
        "Allow model code from the model's repository.",
    ),
    Setting(
        "huggingface_hub_cache",
        ("HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"),
        str,
        None,
        "Hub cache to resolve hub ids from.",
    ),
    Setting(
        "cache_dir",
        ("TGI_CACHE_DIR",),
        str,
        None,
        "Where converted models are kept between starts; default ~/.cache/tgi.",
    ),
    Setting(
        "cpu_threads",
        ("TGI_CPU_THREADS",),
        int,
        None,
        "Threads for CPU compute; default the cores this process may use.",
    ),
    Setting(
        "api_key",
        ("API_KEY",),
        _secret,
        None,
        "Requests must carry `Authorization: Bearer <key>` (else 401), except those to "
        "--api-key-exempt paths.",
    ),
    Setting(
        "api_key_exempt",
        ("TGI_API_KEY_EXEMPT",),
        _names,
        ("/health", "/ping", "/metrics"),
        "Paths served without --api-key (comma list; probes and scrapers need them).",
    ),
    Setting(
        "cors_allow_origin",
        ("CORS_ALLOW_ORIGIN",),
        _names,
        (),
        "Origins browsers may call from (repeatable or comma list; * for any); unset "
        "sends no CORS headers.",
    ),
    Setting(
        "cors_allow_credentials",
        ("TGI_CORS_ALLOW_CREDENTIALS",),
        _bool,
        False,
        "Let browsers send credentials (cookies, Authorization) cross-origin.",
    ),
    Setting(
        "cors_allow_methods",
        ("TGI_CORS_ALLOW_METHODS",),
        _names,
        ("GET", "POST"),
        "Methods a CORS preflight allows (comma list).",
    ),
    Setting(
        "cors_allow_headers",
        ("TGI_CORS_ALLOW_HEADERS",),
        _names,
        ("content-type", "authorization", "x-request-id"),
        "Request headers a CORS preflight allows (comma list).",
    ),
    Setting(
        "keep_alive_timeout",
        ("TGI_KEEP_ALIVE_TIMEOUT",),
        _positive(int),
        5,
        "Seconds an idle keep-alive connection stays open after a response.",
    ),
    Setting(
        "header_read_timeout",
        ("TGI_HEADER_READ_TIMEOUT",),
        _positive(float),
        10.0,
        "Seconds a connection may take to send a request's headers before it is closed "
        "(slow or half-open clients).",
    ),
    Setting(
        "max_connections",
        ("TGI_MAX_CONNECTIONS",),
        _positive(int),
        None,
        "Open connections (or requests) past which new requests get 503; unset: no cap.",
    ),
    Setting(
        "otlp_endpoint",
        ("OTLP_ENDPOINT",),
        _otlp_endpoint,
        None,
        "OTLP gRPC collector to send OpenTelemetry traces to (needs the otel extra).",
    ),
    Setting(
        "otlp_service_name",
        ("OTLP_SERVICE_NAME",),
        str,
        "text-generation-inference.router",
        "service.name of the traces.",
    ),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


class ServeConfig(BaseModel):
    """Everything `tgi serve` was asked for, resolved. Frozen: derive copies instead."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str | None = None
    revision: str | None = None
    dtype: Dtype | None = None
    quantize: Quantize | None = None
    speculate: int | None = None
    kv_cache_dtype: KvCacheDtype | None = None
    kv_cache_memory: int | None = None
    prefix_caching: bool = True
    overlap_steps: bool = False
    shutdown_timeout: float = 25.0
    engine_process: bool = True
    engine_huge_pages: bool = True
    engine_step_timeout: float = 600.0
    max_engine_restarts: int = 3
    num_shard: int = 1
    sharded: bool | None = None
    backend: str | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    waiting_served_ratio: float = 1.2
    max_waiting_tokens: int = 20
    validation_workers: int = 2
    payload_limit: int = 2_000_000
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    sse_keep_alive_s: float = 15.0
    json_output: bool = False
    trust_remote_code: bool = False
    huggingface_hub_cache: str | None = None
    cache_dir: str | None = None
    cpu_threads: int | None = None
    api_key: Secret | None = None
    api_key_exempt: Names = ("/health", "/ping", "/metrics")
    cors_allow_origin: Names = ()
    cors_allow_credentials: bool = False
    cors_allow_methods: Names = ("GET", "POST")
    cors_allow_headers: Names = ("content-type", "authorization", "x-request-id")
    keep_alive_timeout: int = 5
    header_read_timeout: float = 10.0
    max_connections: int | None = None
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"
    # `--backend-option KEY=VALUE` as given, untyped: only the chosen backend's declared
    # flags (`BackendOptions.flags`) say what KEY means (`resolve_backend_options`)
    backend_option_args: dict[str, str] = {}
    # the chosen backend's own flags, typed: every declared flag, from the CLI, its
    # environment variable or its default; empty until a backend is chosen
    backend_options: dict[str, Any] = {}
    # setting name (or "backend_option.<key>") -> "cli", "env NAME", "derived (...)",
    # "backend <name>" or "default"
    sources: dict[str, str] = {}
    # the environment at start-up, for backends' own settings (read them from here)
    environ: dict[str, str] = {}

    def source_of(self, name: str) -> str:
        return self.sources.get(name, "default")

    def with_values(self, source: str, **values: Any) -> ServeConfig:
        """A copy with `values` set and their source recorded as `source`."""
        sources = dict(self.sources)
        sources.update({name: source for name in values})
        return self.model_copy(update={**values, "sources": sources})

    @property
    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        xdg = self.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg else Path(self.environ.get("HOME", str(Path.home()))) / ".cache"
        return base / "tgi"

    def log_summary(self) -> None:
        """Log every setting once, with where it came from."""
        for setting in SETTINGS:
            logger.info(
                "%s = %r (%s)",
                setting.name,
                getattr(self, setting.name),
                self.source_of(setting.name),
            )
        for name, value in self.backend_options.items():
            logger.info(
                "backend option %s = %r (%s)",
                name,
                value,
                self.source_of(f"backend_option.{name}"),
            )


def snapshot_environ() -> dict[str, str]:
    """The process environment, read once here so nothing else has to."""
    return dict(os.environ)


def env_help(name: str) -> str:
    """Help text for a CLI option, naming its environment variable as TGI's launcher does."""
    setting = _BY_NAME[name]
    default = f" [default: {setting.default}]" if setting.default is not None else ""
    return f"{setting.help} [env: {setting.env[0]}]{default}"


def resolve_config(cli_values: Mapping[str, Any], environ: Mapping[str, str]) -> ServeConfig:
    """Merge command line values (None = not given) over the environment over defaults.

    `cli_values["backend_option"]` takes the raw `--backend-option KEY=VALUE` strings;
    they are typed later, against the chosen backend's flags (`resolve_backend_options`).
    """
    cli_values = dict(cli_values)
    option_args = parse_backend_option_args(cli_values.pop("backend_option", None) or ())
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        given = cli_values.get(setting.name)
        if given is not None:
            if isinstance(given, str) and setting.parse is not str:
                try:
                    given = setting.parse(given)
                except ValueError as exc:
                    raise ConfigError(f"--{setting.name.replace('_', '-')}: {exc}") from None
            values[setting.name] = given
            sources[setting.name] = "cli"
            continue
        for var in setting.env:
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[setting.name] = setting.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"environment variable {var}={raw!r}: {exc}") from None
            sources[setting.name] = f"env {var}"
            break
        else:
            values[setting.name] = setting.default
    unknown = set(cli_values) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown settings: {sorted(unknown)}")
    config = ServeConfig(
        **values, backend_option_args=option_args, sources=sources, environ=dict(environ)
    )
    _check_ranges(config)
    return _resolve_sharding(config)


def _resolve_sharding(config: ServeConfig) -> ServeConfig:
    """--num-shard against --sharded and against a job launched by torchrun, whose
    WORLD_SIZE is the shard count."""
    from tgi.parallel.env import rank_environment

    try:
        job = rank_environment(config.environ)
    except ValueError as exc:
        raise ConfigError(f"torch.distributed variables: {exc}") from None
    if job is not None:
        if config.source_of("num_shard") != "default" and config.num_shard != job.world_size:
            raise ConfigError(
                f"--num-shard {config.num_shard} ({config.source_of('num_shard')}) but this "
                f"process is one of WORLD_SIZE={job.world_size} ranks (torchrun); leave "
                "--num-shard unset or make them equal"
            )
        config = config.with_values("env WORLD_SIZE", num_shard=job.world_size)
    if config.num_shard < 1:
        raise ConfigError(
            f"--num-shard must be positive, got {config.num_shard} "
            f"({config.source_of('num_shard')})"
        )
    if config.sharded is False and config.num_shard > 1:
        raise ConfigError(
            f"--sharded false ({config.source_of('sharded')}) contradicts --num-shard "
            f"{config.num_shard} ({config.source_of('num_shard')})"
        )
    if config.sharded is True and config.num_shard == 1:
        raise ConfigError(
            f"--sharded true ({config.source_of('sharded')}) needs --num-shard N with N > 1: "
            "tgi does not guess how many devices to split over"
        )
    return config


def parse_backend_option_args(args: Iterable[str]) -> dict[str, str]:
    """`["engine=paged", "num-cores=2"]` -> `{"engine": "paged", "num_cores": "2"}`.

    Keys are lower-cased with `-` read as `_`; a key given twice is an error.
    """
    parsed: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--backend-option {arg!r}: expected KEY=VALUE, e.g. engine=paged")
        if key in parsed:
            raise ConfigError(f"--backend-option {key} is given twice")
        parsed[key] = value.strip()
    return parsed


def backend_option_env(backend: str, flag: BackendFlag) -> str:
    """The environment variable of a backend's flag: its own, else `TGI_<BACKEND>_<KEY>`."""
    if flag.env:
        return flag.env
    return f"TGI_{backend}_{flag.name}".upper().replace("-", "_")


def _parse_flag(flag: BackendFlag, raw: str) -> Any:
    if flag.type is bool:
        value: Any = _bool(raw)
    else:
        try:
            value = flag.type(raw.strip())
        except ValueError:
            raise ValueError(f"expected {flag.type.__name__}, got {raw!r}") from None
    if flag.choices and str(value) not in flag.choices:
        raise ValueError(f"expected one of {', '.join(flag.choices)}; got {raw!r}")
    return value


def resolve_backend_options(
    config: ServeConfig, backend: str, flags: Sequence[BackendFlag]
) -> ServeConfig:
    """A copy with `backend_options` holding every flag `backend` declares, typed.

    Per flag: `--backend-option KEY=VALUE`, then its environment variable
    (`backend_option_env`), then its default. Raises `ConfigError` naming the flag and
    where its value came from when a value does not parse, and for a `--backend-option`
    key that the backend does not declare (listing those it does).
    """
    if not flags and not config.backend_option_args:
        return config
    declared = {flag.name: flag for flag in flags}
    unknown = sorted(set(config.backend_option_args) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise ConfigError(
            f"--backend-option {', '.join(unknown)} (cli): backend {backend!r} declares no "
            f"such option; its options: {known}"
        )
    options: dict[str, Any] = {}
    sources = dict(config.sources)
    for flag in flags:
        var = backend_option_env(backend, flag)
        if flag.name in config.backend_option_args:
            raw, source = config.backend_option_args[flag.name], "cli"
        elif config.environ.get(var, "") != "":
            raw, source = config.environ[var], f"env {var}"
        else:
            options[flag.name] = flag.default
            sources[f"backend_option.{flag.name}"] = "default"
            continue
        try:
            options[flag.name] = _parse_flag(flag, raw)
        except ValueError as exc:
            raise ConfigError(
                f"--backend-option {flag.name}={raw} ({source}) for backend {backend!r}: {exc}"
            ) from None
        sources[f"backend_option.{flag.name}"] = source
    return config.model_copy(update={"backend_options": options, "sources": sources})


def _check_ranges(config: ServeConfig) -> None:
    positive = (
        "port",
        "max_input_tokens",
        "max_total_tokens",
        "max_batch_prefill_tokens",
        "max_batch_total_tokens",
        "max_batch_size",
        "max_concurrent_requests",
        "max_best_of",
        "validation_workers",
        "payload_limit",
        "cpu_threads",
        "sse_keep_alive_s",
        "kv_cache_memory",
        "engine_step_timeout",
        "shutdown_timeout",
    )
    for name in positive:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be positive, got {value} "
                f"({config.source_of(name)})"
            )
    _check_watermark(config)
    for name in ("speculate", "max_engine_restarts"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(
                f"--{name.replace('_', '-')} must not be negative, got {value} "
                f"({config.source_of(name)})"
            )


def _check_watermark(config: ServeConfig) -> None:
    if not 0.0 < config.watermark_gamma < 1.0:
        raise ConfigError(
            f"WATERMARK_GAMMA must be inside (0, 1), got {config.watermark_gamma} "
            f"({config.source_of('watermark_gamma')})"
        )
    if config.watermark_delta < 0.0:
        raise ConfigError(
            f"WATERMARK_DELTA must not be negative, got {config.watermark_delta} "
            f"({config.source_of('watermark_delta')})"
        )


def derive_limits(config: ServeConfig, max_position_embeddings: int | None) -> ServeConfig:
    """Fill the token limits left unset, from the model's context length as TGI does.

    Defaults: max_total_tokens = min(model context, 4096); max_input_tokens =
    max_total_tokens - 1; max_batch_prefill_tokens = max_input_tokens + 50. Raises
    `ConfigError` naming both flags when the given values contradict each other.
    """
    updates: dict[str, Any] = {}
    total = config.max_total_tokens
    if total is None:
        if config.max_input_tokens is not None:
            total = config.max_input_tokens + 1
            why = "derived (max_input_tokens + 1)"
        else:
            context = max_position_embeddings or DEFAULT_MAX_TOTAL_TOKENS_CAP
            total = min(context, DEFAULT_MAX_TOTAL_TOKENS_CAP)
            why = f"derived (min(model context {context}, {DEFAULT_MAX_TOTAL_TOKENS_CAP}))"
        config = config.with_values(why, max_total_tokens=total)
    if config.max_input_tokens is None:
        config = config.with_values("derived (max_total_tokens - 1)", max_input_tokens=total - 1)
    if config.max_batch_prefill_tokens is None:
        assert config.max_input_tokens is not None  # set just above
        updates["max_batch_prefill_tokens"] = config.max_input_tokens + 50
        config = config.with_values("derived (max_input_tokens + 50)", **updates)
    _check_limits(config, max_position_embeddings)
    return config


def _check_limits(config: ServeConfig, max_position_embeddings: int | None) -> None:
    total, inputs = config.max_total_tokens, config.max_input_tokens
    prefill, batch_total = config.max_batch_prefill_tokens, config.max_batch_total_tokens
    assert total is not None and inputs is not None and prefill is not None
    if inputs >= total:
        raise ConfigError(
            f"--max-input-tokens ({inputs}, {config.source_of('max_input_tokens')}) must be "
            f"below --max-total-tokens ({total}, {config.source_of('max_total_tokens')})"
        )
    if prefill < inputs:
        raise ConfigError(
            f"--max-batch-prefill-tokens ({prefill}, "
            f"{config.source_of('max_batch_prefill_tokens')}) must be at least "
            f"--max-input-tokens ({inputs}): a prompt of max_input_tokens could never be prefilled"
        )
    if batch_total is not None and batch_total < total:
        raise ConfigError(
            f"--max-batch-total-tokens ({batch_total}) must be at least --max-total-tokens "
            f"({total}): one full-length request must fit"
        )
    if max_position_embeddings is not None and total > max_position_embeddings:
        logger.warning(
            "max_total_tokens %d exceeds the model's context length %d; output past it may degrade",
            total,
            max_position_embeddings,
        )
