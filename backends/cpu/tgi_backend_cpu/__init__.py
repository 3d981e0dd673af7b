"""tgi's CPU backend: any transformers causal LM, one KV cache per sequence.

The entry point is `tgi_backend_cpu.plugin`; `TransformersCpuBackend` lives in
`tgi_backend_cpu.backend` and loads lazily so probing never imports transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TransformersCpuBackend"]


def __getattr__(name: str) -> Any:
    if name == "TransformersCpuBackend":
        from tgi_backend_cpu.backend import TransformersCpuBackend

        return TransformersCpuBackend
    raise AttributeError(f"module 'tgi_backend_cpu' has no attribute {name!r}")
