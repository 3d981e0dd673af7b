"""`CudaBackend`: the core's paged runner (`tgi.runner`) on a GPU, CUDA or ROCm.

NOTE: what is the core's and what is this package's. The runner owns the step: block
tables per sequence (grown by appends, mirrored on the device), one flattened forward
over every row, logits for the rows that want them; the core's sampler samples on the
logits' device. This package supplies the seam (`GpuDevice`): the attention
implementation (`attention`), KV sizing from device memory, decode graphs (`graphs`),
weights loaded straight onto the device.

Test mode: `device="cpu"` runs the very same path on the CPU (SDPA, or the Triton
kernels under `TRITON_INTERPRET=1`; graphs as their padded stand-in), which is how the
conformance suite and the GPU check's dry run exercise it without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tgi.errors import BackendError
from tgi.models.llama import LlamaForCausalLM, load_llama
from tgi.models.rope import Rotary
from tgi.parallel import joined_group
from tgi.runner import DEFAULT_BLOCK_SIZE, PagedModelRunner, RunnerBackend
from tgi_backend_cuda.attention import choose_attention
from tgi_backend_cuda.device import GpuDevice, MemoryInfo
from tgi_backend_cuda.graphs import parse_graph_sizes
from tgi_backend_cuda.platform import CUDA, GpuPlatform

if TYPE_CHECKING:
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles
    from tgi.parallel.group import ShardGroup

logger = logging.getLogger(__name__)

__all__ = ["KV_DTYPES", "CudaBackend"]

BLOCK_SIZE = DEFAULT_BLOCK_SIZE
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {
    **DTYPES,
    "fp8": torch.float8_e4m3fn,  # TGI's spelling of e4m3
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


class CudaBackend(RunnerBackend):
    """`tgi.backend.Backend` over `tgi.runner.PagedModelRunner` and a `GpuDevice`."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        *,
        device: torch.device | str,
        attention: str | None = None,
        kv_dtype: torch.dtype | None = None,
        cuda_graphs: Sequence[int] | None = None,
        memory_fraction: float = 1.0,
        kv_cache_memory: int | None = None,
        platform: GpuPlatform = CUDA,
        memory_info: MemoryInfo | None = None,
    ) -> None:
        """`model` already on `device`; `cuda_graphs`: decode batch sizes to capture
        (None: TGI's default sizes, (): none); `attention`: None picks the best."""
        self.platform = platform
        self.dtype = model.dtype
        self.attention_name, self.attention_reason = choose_attention(
            attention, device, platform, model.dtype
        )
        graph_sizes = parse_graph_sizes(None) if cuda_graphs is None else tuple(cuda_graphs)
        self.device = GpuDevice(
            device,
            kv_dtype=kv_dtype or model.dtype,
            attention=self.attention_name,
            platform=platform,
            graph_sizes=graph_sizes,
            memory_fraction=memory_fraction,
            kv_cache_memory=kv_cache_memory,
            memory_info=memory_info,
        )
        self.runner = PagedModelRunner(model, self.device, block_size=BLOCK_SIZE)
        logger.info(
            "%s backend on %s: %s attention (%s), %s, KV %s",
            platform.name,
            self.device.device,
            self.attention_name,
            self.attention_reason,
            self.dtype,
            self.device.kv_dtype,
        )

    @classmethod
    def from_path(
        cls,
        model_dir: Path | Any,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        group: ShardGroup | None = None,
        **options: Any,
    ) -> CudaBackend:
        """Load a Llama-family checkpoint straight onto `device`, one tensor at a time
        (this rank's slices of it with a rank `group`)."""
        started = time.perf_counter()
        try:
            model = load_llama(model_dir, dtype, group=group, device=device)
        except (OSError, KeyError, ValueError) as exc:
            raise BackendError(f"cannot load a Llama-family model from {model_dir}: {exc}") from exc
        logger.info("loaded %s onto %s in %.2f s", model_dir, device, time.perf_counter() - started)
        return cls(model, device=device, **options)

    @classmethod
    def from_model(
        cls,
        model: LlamaForCausalLM,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> CudaBackend:
        """A model built elsewhere (random weights for a benchmark), moved if needed."""
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        model.rotary = Rotary(model.spec.rope, device)  # a plain object: .to() skips it
        return cls(model, device=device, **options)

    @classmethod
    def from_config(
        cls,
        config: ServeConfig,
        model: ModelFiles,
        *,
        rank: int = 0,
        world_size: int = 1,
        platform: GpuPlatform = CUDA,
    ) -> CudaBackend:
        """The backend `tgi serve` asks for: its options from `config.backend_options`
        (`plugin.GPU_FLAGS`), the device from the rank (LOCAL_RANK's GPU); with several
        ranks, this rank's shard over the group its worker joined (NCCL between GPUs)."""
        group = joined_group(world_size)
        options = config.backend_options
        device = _device(options.get("device") or "cuda", rank)
        if device.type == "cuda":
            # graphs, Triton's launches and NCCL use the current device: this rank's GPU
            torch.cuda.set_device(device)
        dtype = DTYPES[config.dtype or "bfloat16"]
        kv_dtype = KV_DTYPES[config.kv_cache_dtype] if config.kv_cache_dtype else None
        graphs = options.get("cuda_graphs")
        return cls.from_path(
            model.path,
            device=device,
            dtype=dtype,
            group=group,
            attention=options.get("attention") or None,
            kv_dtype=kv_dtype,
            cuda_graphs=parse_graph_sizes(graphs, config.max_batch_size),
            memory_fraction=float(options.get("cuda_memory_fraction") or 1.0),
            kv_cache_memory=config.kv_cache_memory,
            platform=platform,
        )

    @property
    def engine_details(self) -> dict[str, str]:
        """How steps run, for /info (`engine.details`)."""
        graphed = self.device.graphed
        return {
            "device": str(self.device.device),
            "attention": self.attention_name,
            "attention_reason": self.attention_reason,
            "graphs": ",".join(map(str, graphed.sizes)) if graphed is not None else "off",
            "kv_dtype": str(self.device.kv_dtype).removeprefix("torch."),
        }

    def close(self) -> None:
        """Drop the pool, the graphs and the weights."""
        super().close()
        self.device.release()
        if self.device.device.type == "cuda":
            torch.cuda.empty_cache()


def _device(name: str, rank: int) -> torch.device:
    """`cuda` means this rank's GPU (rank i on GPU i of the host); `cpu` is test mode."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        import os

        local = os.environ.get("LOCAL_RANK", "")
        return torch.device("cuda", int(local) if local.isdigit() else rank)
    return device
