"""Paged attention kernels of the CUDA backend, all with one signature.

`paged_attention_torch` is plain torch (the reference, and the fallback where neither
Triton nor FlashInfer is there); `paged_attention_triton` is loaded on first access, so
importing this package never imports Triton.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tgi_backend_cuda.kernels.reference import paged_attention_torch

if TYPE_CHECKING:
    from tgi_backend_cuda.kernels.triton_attention import paged_attention_triton

__all__ = ["paged_attention_torch", "paged_attention_triton"]


def __getattr__(name: str) -> Any:
    if name == "paged_attention_triton":
        from tgi_backend_cuda.kernels import triton_attention

        return triton_attention.paged_attention_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
