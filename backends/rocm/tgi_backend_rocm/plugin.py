"""The `rocm` entry point of the `tgi.backends` group: probe, validate, create.

ROCm's torch answers the `torch.cuda` API (HIP underneath), so this backend builds the
CUDA backend's runner (`tgi_backend_cuda.backend.CudaBackend`) with the ROCm platform.
What differs lives here: the probe (a ROCm torch build and AMD GPUs, read from files;
nothing initialises HIP), the attention kernels offered (Triton or torch's SDPA;
FlashInfer has no ROCm build) and the name. A machine has CUDA's torch or ROCm's, never
both, so `rocm` shares CUDA's priority.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from tgi.backend.hookspecs import FLOAT_DTYPES, BackendFlag, BackendOptions, BackendProbe, hookimpl
from tgi.errors import ConfigError
from tgi_backend_rocm._probe import AmdGpu, HardwareCheck, check_hardware

if TYPE_CHECKING:
    from tgi_backend_cuda.plugin import GpuInfo

    from tgi.backend.contract import Backend
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION",
    "ATTENTION_CHOICES",
    "DEVICE_ENV",
    "NAME",
    "PRIORITY",
    "TGI_CONTRACT_VERSION",
    "gpu_flags",
    "probe",
    "tgi_backend_create",
    "tgi_backend_options",
    "tgi_backend_probe",
    "tgi_validate_config",
]

TGI_CONTRACT_VERSION = 2  # the backend contract this module implements
NAME = "rocm"
PRIORITY = 100  # an accelerator, as cuda: a machine has one or the other; the CPU is 10
DISTRIBUTION = "tgi-backend-rocm"
DEVICE_ENV = "TGI_ROCM_DEVICE"  # the `device` flag's variable: cpu is the test mode
ATTENTION_CHOICES = ("triton", "sdpa")  # no FlashInfer: it ships no ROCm build
# Replaces the CUDA backend's `attention` flag, which also offers flashinfer.
ATTENTION = BackendFlag(
    "attention",
    "attention implementation: triton or sdpa (default: the best available)",
    env="TGI_ATTENTION",
    choices=ATTENTION_CHOICES,
)


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


def probe(environ: Mapping[str, str], hardware: HardwareCheck | None = None) -> BackendProbe:
    """The probe's answer; `hardware` defaults to looking at this machine.

    `TGI_ROCM_DEVICE=cpu` (the CUDA runner's test mode, on the ROCm platform's
    attention choices) answers available but emulated: never picked automatically.
    """
    if environ.get(DEVICE_ENV, "").strip().lower() == "cpu":
        return _answer(True, f"test mode on the CPU ({DEVICE_ENV}=cpu)", emulated=True)
    hardware = hardware or check_hardware(environ)
    return _answer(hardware.available, hardware.reason)


def _answer(available: bool, reason: str, *, emulated: bool = False) -> BackendProbe:
    return BackendProbe(
        name=NAME,
        version=_version(),
        available=available,
        reason=reason,
        priority=PRIORITY,
        batching="continuous",
        emulated=emulated,
    )


@hookimpl
def tgi_backend_probe(environ: Mapping[str, str]) -> BackendProbe:
    """A ROCm torch, the CUDA backend and reachable AMD GPUs? Reads files; runs no HIP."""
    return probe(environ)


def gpu_flags() -> tuple[BackendFlag, ...]:
    """The CUDA backend's flags (its runner reads them), with ROCm's attention choices.

    Taken from `tgi_backend_cuda.plugin.GPU_FLAGS`, so a flag the runner gains reaches
    ROCm users too. Without the CUDA backend nothing here can run (the probe says so),
    and only the attention flag is declared.
    """
    try:
        from tgi_backend_cuda.plugin import GPU_FLAGS
    except ImportError:  # not installed: the probe answers unavailable and names it
        return (ATTENTION,)
    return tuple(ATTENTION if flag.name == ATTENTION.name else flag for flag in GPU_FLAGS)


@hookimpl
def tgi_backend_options() -> BackendOptions:
    """Float compute; KV in float or fp8; no --quantize; one worker per GPU over RCCL."""
    return BackendOptions(
        quantize=frozenset(),
        dtypes=FLOAT_DTYPES,
        # KV is stored in the OCP formats named here ("fp8" is TGI's e4m3fn). gfx942
        # (MI300)'s native fp8 is the fnuz variant (no negative zero, one NaN, another
        # exponent bias), so on it the KV store converts on the way in and out.
        kv_cache_dtypes=FLOAT_DTYPES | {"fp8", "fp8_e4m3fn", "fp8_e5m2"},
        flags=gpu_flags(),
        parallelism="ranks",  # torch.distributed's "nccl" backend is RCCL on ROCm
    )


def _gpu_info(gpu: AmdGpu) -> GpuInfo:
    """The CUDA backend's view of an AMD GPU: the capability ROCm's torch reports for
    it, (major, minor) of its gfx target (gfx942 -> (9, 4))."""
    from tgi_backend_cuda.plugin import GpuInfo

    return GpuInfo(
        name=gpu.product or f"AMD GPU {gpu.gfx_target}",
        memory_bytes=gpu.vram_bytes or 0,
        capability=gpu.capability,
    )


@hookimpl
def tgi_validate_config(config: ServeConfig) -> ServeConfig | None:
    """The CUDA backend's GPU checks (`validate_gpu_config`) against the first AMD GPU,
    and one GPU per shard; fills --dtype where unset, as the CUDA backend does.

    The core has already refused --quantize (this backend offers none), a --dtype or
    --kv-cache-dtype outside `tgi_backend_options` and an attention other than triton
    or sdpa, each naming where the value came from. Raises ConfigError for a
    --num-shard above the AMD GPUs present, and for what `validate_gpu_config` refuses
    (CUDA_GRAPHS that are not batch sizes, CUDA_MEMORY_FRACTION outside (0, 1]).
    """
    from tgi_backend_cuda.plugin import validate_gpu_config

    test_mode = config.backend_options.get("device") == "cpu"
    gpus = () if test_mode else check_hardware(config.environ).gpus
    if gpus and config.num_shard > len(gpus):
        raise ConfigError(
            f"--num-shard {config.num_shard} ({config.source_of('num_shard')}): this "
            f"machine has {len(gpus)} AMD GPU(s), one per shard; lower --num-shard"
        )
    adjusted: ServeConfig | None = validate_gpu_config(
        config, NAME, _gpu_info(gpus[0]) if gpus else None
    )
    return adjusted


@hookimpl
def tgi_backend_create(
    config: ServeConfig, model: ModelFiles, rank: int, world_size: int
) -> Backend:
    """Load `model` (rank `rank`'s slice of `world_size`) with the CUDA runner on ROCm."""
    from tgi_backend_cuda.backend import CudaBackend
    from tgi_backend_cuda.platform import ROCM

    logger.info("rocm: the CUDA runner on HIP, rank %d of %d", rank, world_size)
    backend: Backend = CudaBackend.from_config(
        config, model, rank=rank, world_size=world_size, platform=ROCM
    )
    return backend
