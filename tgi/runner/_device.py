"""The seam between the paged runner and a device: what a backend supplies.

NOTE: the runner (`tgi.runner.PagedModelRunner`) owns everything a step means: each
sequence's block table, the step layout, one forward over every row, logits for the rows
that want them. A backend owns what differs by device, through two small protocols:

- `RunnerDevice`: where tensors live and how a step's host tensors get there, how many KV
  blocks fit, how the pool is allocated, what the model's linears become (quantization)
  and what runs a step (eager, compiled, captured graphs after warmup);
- `AttentionBackend`: the attention op the model calls per layer (writes k/v into the
  pool, attends), and `plan`, which turns the step's device-neutral `StepLayout` into the
  metadata that op reads (CPU: masks and dense rows for SDPA; CUDA: a FlashInfer plan).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from tgi.models.attention import AttentionOp

if TYPE_CHECKING:
    from tgi.backend.contract import Limits, StepConstraints
    from tgi.models.llama import LlamaForCausalLM, LlamaSpec
    from tgi.runner._kv import KvPool
    from tgi.runner._layout import StepLayout

__all__ = ["AttentionBackend", "ModelForward", "RunnerDevice"]


class ModelForward(Protocol):
    """What runs one step: `LlamaForCausalLM.__call__`'s signature."""

    def __call__(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        attention: AttentionOp,
        metadata: Any = None,
        logits_index: torch.Tensor | None = None,  # [M]; None: every token
    ) -> torch.Tensor:  # [M, V] float32
        ...


class AttentionBackend(AttentionOp, Protocol):
    """A device's attention op over a `KvPool`, and the per-step planning it needs."""

    def plan(self, layout: StepLayout) -> Any:
        """Once per step, before the forward: the metadata every layer's call reads."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forget any state kept per sequence (unknown ids are ignored)."""
        ...


class RunnerDevice(Protocol):
    """Everything `PagedModelRunner` asks of a device; one instance per runner."""

    device: torch.device  # where the step's tensors and the KV pool live
    kv_dtype: torch.dtype  # KV storage dtype
    kv_memory_setting: str  # the setting that gives KV more memory, for error messages

    def prepare_model(self, model: LlamaForCausalLM) -> ModelForward:
        """Once, before warmup: swap linears (quantize), compile; return what runs steps."""
        ...

    def upload(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The step's host tensors on `device`, in as few copies as it allows (a GPU: one
        pinned, non-blocking copy, so planning never waits for the previous step)."""
        ...

    def prepare_steps(
        self, forward: ModelForward, attention: AttentionBackend, limits: Limits
    ) -> tuple[ModelForward, StepConstraints]:
        """Once per warmup, after its forwards ran: what runs steps from now on (the same
        `forward`, or one that replays captured graphs) and the step shapes the policy
        should know (`StepConstraints.graph_batch_sizes`)."""
        ...

    def num_blocks(self, limits: Limits, block_size: int, bytes_per_token: int) -> int:
        """KV blocks of `block_size` tokens this device gives the pool under `limits`
        (`limits.max_batch_total_tokens` when set, else what its memory allows)."""
        ...

    def allocate_kv(self, spec: LlamaSpec, num_blocks: int, block_size: int) -> KvPool:
        """The zero-filled pool of `num_blocks` blocks."""
        ...

    def attention(self, pool: KvPool, spec: LlamaSpec, max_length: int) -> AttentionBackend:
        """The attention backend over `pool` for `spec`'s layers (their sliding windows);
        `max_length`: one sequence's most tokens."""
        ...
