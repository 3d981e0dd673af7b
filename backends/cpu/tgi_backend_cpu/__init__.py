"""tgi's CPU backend: the paged engine for Llama-family models, a generic fallback else.

The entry point is `tgi_backend_cpu.plugin`; `PagedCpuBackend` (`tgi_backend_cpu.paged`)
and `TransformersCpuBackend` (`tgi_backend_cpu.backend`) load lazily so probing never
imports a model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PagedCpuBackend", "TransformersCpuBackend"]


def __getattr__(name: str) -> Any:
    if name == "TransformersCpuBackend":
        from tgi_backend_cpu.backend import TransformersCpuBackend

        return TransformersCpuBackend
    if name == "PagedCpuBackend":
        from tgi_backend_cpu.paged import PagedCpuBackend

        return PagedCpuBackend
    raise AttributeError(f"module 'tgi_backend_cpu' has no attribute {name!r}")
