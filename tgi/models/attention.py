"""The attention op a backend hands to a model, and a plain reference op.

NOTE: models own the math around attention (projections, rotary, norms); the backend owns
the KV layout. So a model never sees a cache: it calls `attention(layer_index, q, k, v,
metadata)` with the step's flat tokens and the op both stores k/v where its layout wants
them (paged blocks, slots, a contiguous buffer) and returns the attention output. A CUDA
backend supplies a flash/paged kernel here, the CPU backend a gather + SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = ["AttentionOp", "DenseAttention"]


class AttentionOp(Protocol):
    """Stores k/v of the step's tokens and attends each query to its sequence's KV."""

    def __call__(
        self,
        layer_index: int,
        q: torch.Tensor,  # [N, num_heads, head_dim], rotated
        k: torch.Tensor,  # [N, num_kv_heads, head_dim], rotated
        v: torch.Tensor,  # [N, num_kv_heads, head_dim]
        metadata: Any,  # whatever the op built for this step (slots, block tables, masks)
    ) -> torch.Tensor:  # [N, num_heads, head_dim]
        """Write k/v into the op's KV, then attend causally (and within any window)."""
        ...


class DenseAttention:
    """One sequence, KV appended to contiguous per-layer tensors: the reference op.

    The step's tokens follow the cached ones; `metadata` is unused. Used by tests and as
    the simplest correct op; a batch of one and a Python list of tensors are no way to
    serve.
    """

    def __init__(self, layer_windows: Sequence[int | None]) -> None:
        self.layer_windows = tuple(layer_windows)
        self.keys: list[torch.Tensor | None] = [None] * len(self.layer_windows)
        self.values: list[torch.Tensor | None] = [None] * len(self.layer_windows)

    def __call__(
        self,
        layer_index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: Any = None,
    ) -> torch.Tensor:
        old_k, old_v = self.keys[layer_index], self.values[layer_index]
        keys = k if old_k is None else torch.cat((old_k, k))  # [L, KVH, D]
        values = v if old_v is None else torch.cat((old_v, v))
        self.keys[layer_index], self.values[layer_index] = keys, values
        num_new, num_keys = q.shape[0], keys.shape[0]
        query_pos = torch.arange(num_keys - num_new, num_keys)[:, None]  # [n, 1]
        key_pos = torch.arange(num_keys)[None, :]  # [1, L]
        allowed = key_pos <= query_pos
        window = self.layer_windows[layer_index]
        if window is not None:
            allowed &= key_pos > query_pos - window
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, H, n, D]
            keys.transpose(0, 1)[None],  # [1, KVH, L, D]
            values.transpose(0, 1)[None],
            attn_mask=allowed[None, None],
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)  # [n, H, D]
