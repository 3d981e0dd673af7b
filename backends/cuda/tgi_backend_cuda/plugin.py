"""The `cuda` entry point of the `tgi.backends` group: probe, options, validate, create.

The probe counts GPUs through NVML (`nvidia-ml-py`), which reads the driver without
creating a CUDA context, so probing before worker ranks fork is safe. It answers
available only with an NVIDIA GPU, a working driver and a torch built for CUDA, and
otherwise says which of the three is missing.

Test mode: `TGI_CUDA_DEVICE=cpu` (or `--backend-option device=cpu`) runs the backend's
whole path on the CPU; the probe then answers available but `emulated`, so it is never
picked automatically.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from tgi.backend.hookspecs import FLOAT_DTYPES, BackendFlag, BackendOptions, BackendProbe, hookimpl
from tgi.errors import ConfigError

if TYPE_CHECKING:
    from tgi.backend.contract import Backend
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = [
    "GPU_FLAGS",
    "NAME",
    "PRIORITY",
    "TGI_CONTRACT_VERSION",
    "GpuInfo",
    "nvml_gpus",
    "tgi_backend_create",
    "tgi_backend_options",
    "tgi_backend_probe",
    "tgi_validate_config",
]

TGI_CONTRACT_VERSION = 2
NAME = "cuda"
PRIORITY = 100  # above the CPU's 10: a GPU that is present wins
DISTRIBUTION = "tgi-backend-cuda"
DEVICE_ENV = "TGI_CUDA_DEVICE"
FP8_KV_CAPABILITY = (8, 9)  # Ada/Hopper: native fp8 conversions (Triton's fp8e4nv)
BF16_CAPABILITY = (8, 0)  # Ampere: bf16 arithmetic

# Flags of both GPU backends (`tgi_backend_rocm` reuses them), with TGI's variables.
GPU_FLAGS = (
    BackendFlag(
        "attention",
        "attention implementation: flashinfer, triton or sdpa (default: the best available)",
        env="TGI_ATTENTION",
        choices=("flashinfer", "triton", "sdpa"),
    ),
    BackendFlag(
        "cuda_graphs",
        "decode batch sizes to capture as graphs, comma-separated; 0 for none "
        "(default 1,2,4,8,16,...,128)",
        env="CUDA_GRAPHS",
    ),
    BackendFlag(
        "cuda_memory_fraction",
        "share of the GPU's memory tgi may use (weights, activations, KV)",
        type=float,
        default=1.0,
        env="CUDA_MEMORY_FRACTION",
    ),
    BackendFlag(
        "device",
        "cuda (the GPU of this rank), or cpu: the backend's test mode",
        default="cuda",
        choices=("cuda", "cpu"),
    ),
)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    name: str
    memory_bytes: int
    capability: tuple[int, int]

    def describe(self) -> str:
        major, minor = self.capability
        return f"{self.name} ({self.memory_bytes / 2**30:.0f} GiB, sm_{major}{minor})"


def nvml_gpus(nvml: Any = None) -> tuple[list[GpuInfo], str | None]:
    """The NVIDIA GPUs NVML sees, or ([], why not); `nvml` is the pynvml module (tests
    hand in a fake)."""
    if nvml is None:
        if importlib.util.find_spec("pynvml") is None:
            return [], "nvidia-ml-py is not installed"
        import pynvml

        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError and its subclasses: no driver, no library
        return [], f"NVML cannot start ({exc}): no NVIDIA driver"
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            gpus.append(
                GpuInfo(
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),  # type: ignore[arg-type]
                )
            )
        return gpus, None if gpus else "NVML sees no GPU"
    except Exception as exc:
        return [], f"NVML failed ({exc})"
    finally:
        with contextlib.suppress(Exception):  # a shutdown failure changes no answer
            nvml.nvmlShutdown()


def torch_build_problem(torch_version: str | None = None) -> str | None:
    """Why the installed torch cannot drive an NVIDIA GPU, or None; read from its
    metadata (importing torch to ask would be slow, and torch.cuda would start CUDA)."""
    if torch_version is None:
        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            return "torch is not installed"
    local = torch_version.partition("+")[2]
    if local == "cpu" or local.startswith("rocm"):
        return f"torch {torch_version} is not a CUDA build"
    return None


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


@hookimpl
def tgi_backend_probe(environ: Mapping[str, str]) -> BackendProbe:
    """Available with an NVIDIA GPU, its driver and a CUDA torch; emulated in test mode."""
    if environ.get(DEVICE_ENV, "").strip().lower() == "cpu":
        return _answer(True, f"test mode on the CPU ({DEVICE_ENV}=cpu)", emulated=True)
    gpus, problem = nvml_gpus()
    if problem is None:
        problem = torch_build_problem()
    if problem is not None:
        return _answer(False, problem)
    names = ", ".join(gpu.describe() for gpu in gpus)
    return _answer(True, f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: {names}")


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
def tgi_backend_options() -> BackendOptions:
    """Float dtypes; KV in them or fp8; no weight quantization yet; a rank per GPU."""
    return BackendOptions(
        dtypes=FLOAT_DTYPES,
        kv_cache_dtypes=FLOAT_DTYPES | {"fp8", "fp8_e4m3fn", "fp8_e5m2"},
        flags=GPU_FLAGS,
        parallelism="ranks",
    )


@hookimpl
def tgi_validate_config(config: ServeConfig) -> ServeConfig | None:
    """Check the GPU settings against the GPU before any weight loads; fill the dtype
    (bf16 where the GPU computes in it, else fp16) so `tgi config` shows it."""
    if config.backend_options.get("device") == "cpu":
        return validate_gpu_config(config, NAME, None)
    gpus, _ = nvml_gpus()
    if config.num_shard > len(gpus):
        raise ConfigError(
            f"--num-shard {config.num_shard} ({config.source_of('num_shard')}) needs one GPU "
            f"per shard; NVML sees {len(gpus)}"
        )
    return validate_gpu_config(config, NAME, gpus[0] if gpus else None)


def validate_gpu_config(
    config: ServeConfig, backend: str, gpu: GpuInfo | None
) -> ServeConfig | None:
    """The checks both GPU backends share; `gpu` None: no GPU to check against."""
    from tgi_backend_cuda.graphs import parse_graph_sizes

    options = config.backend_options
    parse_graph_sizes(options.get("cuda_graphs"), config.max_batch_size)
    fraction = options.get("cuda_memory_fraction", 1.0)
    if not 0.0 < float(fraction) <= 1.0:
        source = config.source_of("backend_option.cuda_memory_fraction")
        raise ConfigError(
            f"cuda_memory_fraction={fraction} ({source}): expected a share of the GPU's "
            "memory in (0, 1]"
        )
    kv = config.kv_cache_dtype or ""
    if gpu is not None and kv.startswith("fp8") and not _fp8_kv(backend, gpu.capability):
        needs = "gfx942 or gfx950" if backend == "rocm" else "compute capability 8.9 or newer"
        raise ConfigError(
            f"--kv-cache-dtype {kv} ({config.source_of('kv_cache_dtype')}) needs a GPU of "
            f"{needs}; {gpu.describe()} is not"
        )
    if config.dtype is None:
        fast_bf16 = gpu is None or gpu.capability >= BF16_CAPABILITY
        return config.with_values(
            f"backend {backend}", dtype="bfloat16" if fast_bf16 else "float16"
        )
    return None


def _fp8_kv(backend: str, capability: tuple[int, int]) -> bool:
    """Whether Triton converts fp8 KV on this GPU: NVIDIA from sm_89 (Ada, Hopper); AMD's
    capability is its gfx target (9, 4) for gfx942, where Triton's AMD fp8 starts."""
    if backend == "rocm":
        return capability[0] == 9 and capability[1] >= 4
    return capability >= FP8_KV_CAPABILITY


@hookimpl
def tgi_backend_create(
    config: ServeConfig, model: ModelFiles, rank: int, world_size: int
) -> Backend:
    """The paged runner on this rank's GPU (`CudaBackend`)."""
    from tgi_backend_cuda.backend import CudaBackend

    return CudaBackend.from_config(config, model, rank=rank, world_size=world_size)
