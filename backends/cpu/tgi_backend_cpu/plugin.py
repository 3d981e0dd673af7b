"""The `cpu` entry point of the `tgi.backends` group: probe, validate, create.

The CPU is always there, so the probe always answers available, at a low priority:
any real accelerator that is present wins when `--backend` names none.

Two engines: the paged one (`tgi_backend_cpu.paged`, Llama-family architectures, one
batched forward per step) and the generic one (`tgi_backend_cpu.backend`, any
transformers causal LM, a cache per row). `TGI_CPU_ENGINE=paged|generic` forces one;
unset (or `auto`) picks paged wherever the architecture allows it.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from tgi.backend.hookspecs import (
    FLOAT_DTYPES,
    BackendFlag,
    BackendOptions,
    BackendProbe,
    hookimpl,
)
from tgi.errors import ConfigError
from tgi_backend_cpu._host import choose_dtype, choose_threads, read_cpu_info

if TYPE_CHECKING:
    from tgi.backend.contract import Backend
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_ENV",
    "NAME",
    "PRIORITY",
    "TGI_CONTRACT_VERSION",
    "choose_engine",
    "tgi_backend_create",
    "tgi_backend_options",
    "tgi_backend_probe",
    "tgi_validate_config",
]

TGI_CONTRACT_VERSION = 2  # the backend contract this module implements
NAME = "cpu"
PRIORITY = 10  # accelerators use higher numbers, so they win wherever they are present
DISTRIBUTION = "tgi-backend-cpu"
ENGINE_ENV = "TGI_CPU_ENGINE"
ENGINES = ("auto", "paged", "generic")
# Architectures `tgi.models.llama` implements (kept here so probing imports no torch model).
PAGED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
# The prefill budget when --max-batch-prefill-tokens is unset and TGI's default
# (max_input_tokens + 50) would be smaller: a CPU's GEMMs run more tokens/s on more
# rows. SmolLM2's four linears of a layer, bf16 on oneDNN, 2 cores of an AMX Xeon:
# 4.3 us per token at 560 rows, 2.8 at 1536, 2.6-2.7 from 1792 to 2600. 1536 rather
# than 2048: in 3 interleaved rounds at 32 streams it served as many tokens/s with a
# lower median time to first token (625 against 748 ms; docs/architecture.md).
PREFILL_BUDGET_TOKENS = 1536


def _engine_setting(config: ServeConfig) -> str:
    raw = config.environ.get(ENGINE_ENV, "").strip().lower() or "auto"
    if raw not in ENGINES:
        raise ConfigError(
            f"environment variable {ENGINE_ENV}={raw!r}: expected one of {', '.join(ENGINES)}"
        )
    return raw


def choose_engine(config: ServeConfig, architecture: str | None) -> str:
    """'paged' or 'generic' for a model of `architecture`; ConfigError for a bad pairing."""
    asked = _engine_setting(config)
    fits = architecture in PAGED_ARCHITECTURES
    if asked == "paged" and not fits:
        raise ConfigError(
            f"{ENGINE_ENV}=paged runs only {', '.join(sorted(PAGED_ARCHITECTURES))}; this "
            f"model is {architecture}. Unset {ENGINE_ENV} to use the generic engine"
        )
    engine = asked if asked != "auto" else ("paged" if fits else "generic")
    if engine == "generic" and config.quantize is not None:
        raise ConfigError(
            f"--quantize {config.quantize} needs the cpu backend's paged engine, which runs "
            f"{', '.join(sorted(PAGED_ARCHITECTURES))}; this model is {architecture}"
            + (f" and {ENGINE_ENV}=generic is set" if asked == "generic" else "")
        )
    return engine


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


@hookimpl
def tgi_backend_probe() -> BackendProbe:
    """Always available; the reason line names the CPU, its torch ISA level and threads."""
    return BackendProbe(
        name=NAME,
        version=_version(),
        available=True,
        reason=read_cpu_info().describe(),
        priority=PRIORITY,
        batching="continuous",
    )


@hookimpl
def tgi_backend_options() -> BackendOptions:
    """int8/int4 weight-only kernels (paged engine); compute and KV in any float dtype."""
    return BackendOptions(
        quantize=frozenset({"int8", "int4"}),
        dtypes=FLOAT_DTYPES,
        kv_cache_dtypes=FLOAT_DTYPES,
        flags=(
            BackendFlag(
                "decode_kernel",
                "bf16 and float32 attention (decode rows and prompt chunks) by the compiled kernel "
                "(built once with the C compiler on the PATH); false keeps SDPA",
                type=bool,
                default=True,
            ),
            BackendFlag(
                "layer_kernels",
                "bf16 and float32 RMSNorm, rotary, SiLU-multiply and KV writes by compiled kernels "
                "(built once with the C compiler on the PATH); false keeps torch's ops",
                type=bool,
                default=True,
            ),
            BackendFlag(
                "onednn_float32",
                "float32 linears by oneDNN with weights packed once (MKL's GEMM was up to "
                "2.7x slower on an AMD EPYC); false keeps F.linear and MKL's bits (with "
                "decode_kernel=false layer_kernels=false: torch's float32 path throughout)",
                type=bool,
                default=True,
            ),
        ),
        parallelism="ranks",  # --num-shard: one worker per rank, gloo between them
    )


@hookimpl
def tgi_validate_config(config: ServeConfig) -> ServeConfig | None:
    """Check the CPU-relevant settings; fill dtype and threads so `tgi config` shows them.

    Raises ConfigError for an unknown TGI_CPU_ENGINE, `--quantize` with
    TGI_CPU_ENGINE=generic, or a thread count above the usable cores; warns (keeps the
    user's choice) for float16 on a CPU without native fp16, where every op converts and
    runs several times slower than float32. --kv-cache-memory / TGI_KV_CACHE_MEMORY is
    parsed and checked by the core (`ServeConfig.kv_cache_memory`), not here.
    """
    cpu = read_cpu_info()
    if _engine_setting(config) == "generic" and config.quantize is not None:
        raise ConfigError(
            f"--quantize {config.quantize} needs the paged cpu engine, but "
            f"{ENGINE_ENV}=generic is set"
        )
    if config.cpu_threads is not None and config.cpu_threads > cpu.num_threads:
        raise ConfigError(
            f"--cpu-threads {config.cpu_threads} ({config.source_of('cpu_threads')}) is more "
            f"than the {cpu.num_threads} cores this process may use; oversubscribed threads "
            f"slow every step. Set it to at most {cpu.num_threads} or leave it unset"
        )
    if config.dtype == "float16" and not cpu.fast_fp16:
        logger.warning(
            "--dtype float16 (%s) on a CPU without avx512_fp16/amx_fp16: torch emulates fp16 "
            "and it is much slower than float32; use --dtype float32%s or leave it unset",
            config.source_of("dtype"),
            " or bfloat16" if cpu.fast_bf16 else "",
        )
    updates: dict[str, Any] = {}
    if config.dtype is None:
        quantized = config.quantize is not None
        updates["dtype"] = str(choose_dtype(None, cpu, quantized=quantized).dtype).removeprefix(
            "torch."
        )
    if config.cpu_threads is None:
        updates["cpu_threads"] = choose_threads(None, cpu)[0]
    filled = config.with_values(f"backend {NAME}", **updates) if updates else config
    budget = _prefill_budget(filled)
    if budget is not None:
        filled = filled.with_values(
            f"backend {NAME} (prefill steps of up to {budget} tokens: the CPU's GEMMs "
            "run faster on more rows)",
            max_batch_prefill_tokens=budget,
        )
    return filled if filled is not config else None


def _prefill_budget(config: ServeConfig) -> int | None:
    """`PREFILL_BUDGET_TOKENS` where TGI's default would be smaller, else None (the core
    derives max_input_tokens + 50): never below what one prompt needs, never above half
    of --max-batch-total-tokens (a plan made ahead needs a prefill budget's blocks free
    beside the running rows: `PagedPolicy.may_plan_ahead`). Known only where
    max_input_tokens or --max-total-tokens is (the core derives one from the other);
    not under TGI_CPU_ENGINE=generic. This hook runs before the model's architecture
    is known, so a model that the generic engine runs under `auto` gets it too (it only
    admits more prompts per step there)."""
    if config.max_batch_prefill_tokens is not None or _engine_setting(config) == "generic":
        return None
    inputs = config.max_input_tokens
    if inputs is None and config.max_total_tokens is not None:
        inputs = config.max_total_tokens - 1
    if inputs is None or inputs + 50 >= PREFILL_BUDGET_TOKENS:
        return None
    budget = PREFILL_BUDGET_TOKENS
    if config.max_batch_total_tokens is not None:
        budget = min(budget, config.max_batch_total_tokens // 2)
    return budget if budget > inputs + 50 else None


@hookimpl
def tgi_backend_create(
    config: ServeConfig, model: ModelFiles, rank: int, world_size: int
) -> Backend:
    """Load `model` into the paged engine where its architecture allows, else the generic
    one; with several ranks, this rank's shard (paged engine only)."""
    architecture = getattr(model, "architecture", None)
    engine = choose_engine(config, architecture)
    logger.info("cpu engine: %s for %s, rank %d of %d", engine, architecture, rank, world_size)
    if world_size > 1 and engine != "paged":
        raise ConfigError(
            f"--num-shard {world_size} splits a model in the cpu backend's paged engine, "
            f"which runs {', '.join(sorted(PAGED_ARCHITECTURES))}; this model is "
            f"{architecture}"
        )
    if engine == "paged":
        from tgi_backend_cpu.paged import PagedCpuBackend

        return PagedCpuBackend.from_config(config, model, world_size=world_size)
    from tgi_backend_cpu.backend import TransformersCpuBackend

    return TransformersCpuBackend.from_config(config, model)
