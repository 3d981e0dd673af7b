"""`GpuDevice`: the runner's seam (`tgi.runner.RunnerDevice`) for CUDA and ROCm GPUs.

NOTE: KV sizing. Unless `--max-batch-total-tokens` or `--kv-cache-memory` fixes the
pool, it takes what is left of the device after the weights and the largest step:

    budget = min(free now, total * memory_fraction - allocated now)
             - peak of a profiling forward at the largest prefill (activations, logits)
             - a reserve for captured graphs and allocator slack

`kv_budget_bytes` is that arithmetic alone, tested against given figures; on a CPU
(the test mode) the "device memory" is a figure handed in, since there is none to read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from tgi.backend.contract import Limits, StepConstraints
from tgi.errors import BackendError
from tgi.runner import BlockTables, KvPool, ModelForward, StepRows, build_step
from tgi_backend_cuda.attention import KernelAttention, make_attention
from tgi_backend_cuda.graphs import GraphedForward
from tgi_backend_cuda.platform import CUDA, GpuPlatform

if TYPE_CHECKING:
    from tgi.models.llama import LlamaForCausalLM, LlamaSpec

logger = logging.getLogger(__name__)

__all__ = ["KV_MEMORY_SETTING", "GpuDevice", "kv_budget_bytes"]

KV_MEMORY_SETTING = (
    "--kv-cache-memory, --backend-option cuda_memory_fraction (CUDA_MEMORY_FRACTION)"
)
GRAPH_RESERVE_FRACTION = 0.02  # of the device: captured graphs' pools, allocator slack
TEST_MODE_MEMORY = 2 * 2**30  # the CPU test mode's stand-in for a device's memory

MemoryInfo = Callable[[], tuple[int, int]]  # () -> (free bytes, total bytes)


def kv_budget_bytes(
    *, free: int, total: int, allocated: int, peak_step: int, fraction: float
) -> int:
    """Bytes the KV pool may take (see the module NOTE); never negative."""
    usable = min(free, int(total * fraction) - allocated)
    reserve = int(total * GRAPH_RESERVE_FRACTION)
    return max(0, usable - peak_step - reserve)


class GpuDevice:
    """Where the CUDA/ROCm backend's runner computes: one GPU (or the CPU, in test mode)."""

    def __init__(
        self,
        device: torch.device | str,
        *,
        kv_dtype: torch.dtype,
        attention: str,
        platform: GpuPlatform = CUDA,
        graph_sizes: Sequence[int] = (),
        memory_fraction: float = 1.0,
        kv_cache_memory: int | None = None,
        memory_info: MemoryInfo | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.kv_dtype = kv_dtype
        self.kv_memory_setting = KV_MEMORY_SETTING
        self.attention_name = attention
        self.platform = platform
        self.graph_sizes = tuple(graph_sizes)
        self.memory_fraction = memory_fraction
        self.kv_cache_memory = kv_cache_memory
        self._memory_info = memory_info or self._read_memory
        self._model: LlamaForCausalLM | None = None
        self.graphed: GraphedForward | None = None  # after warmup, where graphs run

    # -- the runner's seam ---------------------------------------------------------------

    def prepare_model(self, model: LlamaForCausalLM) -> ModelForward:
        """The model runs as loaded (on this device); graphs come at `prepare_steps`."""
        self._model = model
        return model

    def upload(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One pinned, non-blocking copy of the step's index tensors (all long)."""
        if self.device.type == "cpu":
            return list(tensors)
        flat = [t.reshape(-1).to(torch.long) for t in tensors]
        packed = torch.cat(flat).pin_memory().to(self.device, non_blocking=True)
        out, offset = [], 0
        for tensor, part in zip(tensors, flat, strict=True):
            out.append(packed[offset : offset + part.numel()].view(tensor.shape))
            offset += part.numel()
        return out

    def prepare_steps(
        self, forward: ModelForward, attention: object, limits: Limits
    ) -> tuple[ModelForward, StepConstraints]:
        """Capture decode graphs where the attention allows it (see `graphs`)."""
        self.graphed = None
        if not self.graph_sizes:
            return forward, StepConstraints()
        if not isinstance(attention, KernelAttention) or not attention.graphable:
            logger.info(
                "%s off: %s attention runs eagerly", self.platform.graphs, self.attention_name
            )
            return forward, StepConstraints()
        self.graphed = GraphedForward(
            forward,
            attention,
            self.graph_sizes,
            limits.max_total_tokens,
            label=self.platform.graphs,
        )
        return self.graphed, StepConstraints(graph_batch_sizes=self.graph_sizes)

    def release(self) -> None:
        """Forget the graphs (they hold the old pool) and the model."""
        self.graphed = None
        self._model = None

    def num_blocks(self, limits: Limits, block_size: int, bytes_per_token: int) -> int:
        """Blocks for `--max-batch-total-tokens`, `--kv-cache-memory`, else what is left
        of the device after a profiling forward (module NOTE)."""
        self.graphed = None  # a second warmup: the old graphs hold the old pool
        bytes_per_block = bytes_per_token * block_size
        if limits.max_batch_total_tokens is not None:
            return -(-limits.max_batch_total_tokens // block_size)
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory // bytes_per_block
        peak = self._profile_peak(limits) + self._graph_bytes()
        free, total = self._memory_info()
        budget = kv_budget_bytes(
            free=free,
            total=total,
            allocated=self._allocated(),
            peak_step=peak,
            fraction=self.memory_fraction,
        )
        logger.info(
            "%s KV budget %.2f GiB: %.2f GiB free of %.2f GiB, fraction %.2f, largest step "
            "and graphs need %.2f GiB",
            self.platform.name,
            budget / 2**30,
            free / 2**30,
            total / 2**30,
            self.memory_fraction,
            peak / 2**30,
        )
        if budget < bytes_per_block:
            raise BackendError(
                f"no device memory left for the KV cache after the weights and a "
                f"{limits.max_batch_prefill_tokens}-token step; raise cuda_memory_fraction, "
                "lower --max-batch-prefill-tokens or use a smaller model"
            )
        return budget // bytes_per_block

    def allocate_kv(self, spec: LlamaSpec, num_blocks: int, block_size: int) -> KvPool:
        """The pool, plus one scratch block past the policy's for graph padding rows."""
        return KvPool(
            spec.num_layers,
            num_blocks + 1,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            self.kv_dtype,
            self.device,
        )

    def attention(self, pool: KvPool, spec: LlamaSpec, max_length: int) -> KernelAttention:
        model_dtype = self._model.dtype if self._model is not None else torch.float32
        return make_attention(
            self.attention_name,
            pool,
            spec.layer_windows,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            self.upload,
            model_dtype,
        )

    # -- memory ----------------------------------------------------------------------------

    def _read_memory(self) -> tuple[int, int]:
        if self.device.type == "cpu":
            return TEST_MODE_MEMORY, TEST_MODE_MEMORY
        return torch.cuda.mem_get_info(self.device)

    def _graph_bytes(self) -> int:
        """What decode graphs will hold beyond the pool: their logits, [B_max, V] fp32."""
        if not self.graph_sizes or self._model is None:
            return 0
        return max(self.graph_sizes) * self._model.spec.vocab_size * 4

    def _allocated(self) -> int:
        if self.device.type == "cpu":
            return 0
        return torch.cuda.memory_allocated(self.device)

    def _profile_peak(self, limits: Limits) -> int:
        """Bytes the largest prefill step needs beyond what is allocated now: measured
        on a GPU (one forward over a throwaway pool), estimated on a CPU."""
        model = self._model
        if model is None:
            raise BackendError("the GPU device sized KV before the model was prepared")
        spec = model.spec
        tokens = max(1, min(limits.max_batch_prefill_tokens, limits.max_total_tokens))
        if self.device.type == "cpu":
            # activations of one layer (a few [tokens, width] tensors) and fp32 logits
            width = max(spec.hidden_size, 2 * spec.intermediate_size)
            return tokens * (4 * width * 4 + spec.vocab_size * 4)
        block_size = 16
        blocks = -(-tokens // block_size)
        pool = KvPool(
            spec.num_layers,
            blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            self.kv_dtype,
            self.device,
        )
        attention = self.attention(pool, spec, tokens)
        tables = BlockTables(blocks, 1, self.device)
        tables.add(0, range(blocks))
        rows = StepRows()
        rows.append(0, 0, [0] * tokens)
        layout = build_step(rows, tables, block_size)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        last = torch.tensor([tokens - 1])  # a prefill wants the last token's logits
        input_ids, positions, index = self.upload([layout.input_ids, layout.positions, last])
        with torch.inference_mode():
            model(input_ids, positions, attention, attention.plan(layout), index)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del pool, attention
        torch.cuda.empty_cache()
        return peak
