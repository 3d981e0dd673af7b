"""`tgi.models.ops.LayerOps` by compiled calls (`csrc/layer_ops.c`), bf16 and float32.

NOTE: one C call per op instead of several torch ops: residual add with RMSNorm, rotary
on q and k in place in the fused QKV output (no copy), SiLU-and-multiply, and the step's
KV write into the pool (used by `_paged_attention`). They round as the torch ops do, so
outputs match the torch path up to last-bit differences in exp and summation order
(the tests hold them to it). Tensors the kernels do not take (float16, mixed dtypes,
odd strides, rows wider than the C code's limit) go to the torch implementation.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tgi.models.ops import LayerOps
from tgi_backend_cpu._native import NativeLibrary, load_library

if TYPE_CHECKING:
    from tgi.models.llama import RMSNorm

__all__ = ["CpuLayerOps", "load_layer_ops"]

# csrc/layer_ops.c's MAX_SIZE (a row's float copy on the stack) and rotary limit
MAX_NORM_SIZE = 16384
MAX_ROTARY_DIM = 1024
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# the dtypes the library's functions take, by their names' suffix
_SUFFIXES = {torch.bfloat16: "bf16", torch.float32: "f32"}
_ARGTYPES = {
    "tgi_add_rms_norm": [_P, _P, _P, _P, _P, _I, _I, _F, _I],
    "tgi_rotary": [_P, _L, _I, _I, _I, _I, _P, _P, _I],
    "tgi_silu_mul": [_P, _P, _I, _I, _I],
    "tgi_write_kv": [_P, _L, _P, _L, _P, _P, _P, _I, _I, _L],
}
_Function = ctypes._CFuncPtr  # type: ignore[name-defined]


class CpuLayerOps(LayerOps):
    """The layer ops of `csrc/layer_ops.c` for bf16 and float32 tensors; torch's for
    the rest."""

    def __init__(self, loaded: NativeLibrary) -> None:
        library = loaded.library
        self.path: Path = loaded.path
        self.build_seconds = loaded.build_seconds
        # name -> dtype -> the C function for that dtype
        self._functions: dict[str, dict[torch.dtype, _Function]] = {}
        for name, argtypes in _ARGTYPES.items():
            by_dtype = self._functions[name] = {}
            for dtype, suffix in _SUFFIXES.items():
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, _I
                by_dtype[dtype] = function
        self._norm = self._functions["tgi_add_rms_norm"]
        self._rotary = self._functions["tgi_rotary"]
        self._silu_mul = self._functions["tgi_silu_mul"]
        self._write_kv = self._functions["tgi_write_kv"]
        # (id(norm), dtype) -> (norm, its weight in dtype); the norm is kept so an id is
        # never reused
        self._weights: dict[tuple[int, torch.dtype], tuple[RMSNorm, torch.Tensor]] = {}

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size, dtype = hidden.shape[-1], hidden.dtype
        takes = dtype in _SUFFIXES and hidden.is_contiguous() and size <= MAX_NORM_SIZE
        if delta is not None:
            takes = takes and delta.dtype == dtype and delta.is_contiguous()
        if not takes:
            return super().add_rms_norm(hidden, delta, norm)
        key = (id(norm), dtype)
        held = self._weights.get(key)
        if held is None:
            held = self._weights[key] = (norm, norm.weight.detach().to(dtype).contiguous())
        weight = held[1]
        rows = hidden.numel() // size
        normed = torch.empty_like(hidden)
        summed = torch.empty_like(hidden) if delta is not None else hidden
        self._check(
            self._norm[dtype](
                hidden.data_ptr(),
                delta.data_ptr() if delta is not None else None,
                weight.data_ptr(),
                summed.data_ptr(),
                normed.data_ptr(),
                rows,
                size,
                norm.eps,
                torch.get_num_threads(),
            ),
            "rms_norm",
        )
        return summed, normed

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates `x` [N, heads, D] (a view of the fused QKV output) in place."""
        rows, heads, head_dim = x.shape
        rotary_dim = cos.shape[-1]
        takes = (
            x.dtype == cos.dtype == sin.dtype
            and x.dtype in _SUFFIXES
            and x.stride(2) == 1
            and x.stride(1) == head_dim
            and cos.is_contiguous()
            and sin.is_contiguous()
            and rotary_dim <= MAX_ROTARY_DIM
        )
        if not takes:
            return super().rotary(x, cos, sin)
        self._check(
            self._rotary[x.dtype](
                x.data_ptr(),
                x.stride(0),
                rows,
                heads,
                head_dim,
                rotary_dim,
                cos.data_ptr(),
                sin.data_ptr(),
                torch.get_num_threads(),
            ),
            "rotary",
        )
        return x

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dtype not in _SUFFIXES or not gate_up.is_contiguous():
            return super().silu_mul(gate_up)
        rows, width = gate_up.shape
        out = gate_up.new_empty((rows, width // 2))
        self._check(
            self._silu_mul[gate_up.dtype](
                gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads()
            ),
            "silu_mul",
        )
        return out

    def write_kv(
        self,
        k: torch.Tensor,  # [N, KVH, D], heads dense within a row
        v: torch.Tensor,
        pool_k: torch.Tensor,  # [slots, KVH, D] contiguous
        pool_v: torch.Tensor,
        slots: torch.Tensor,  # [N] int64
    ) -> None:
        """pool_k[slots] = k and pool_v[slots] = v, one call for both."""
        width = pool_k.shape[1] * pool_k.shape[2]
        takes = (
            k.dtype == v.dtype == pool_k.dtype == pool_v.dtype
            and k.dtype in _SUFFIXES
            and k.stride(2) == v.stride(2) == 1
            and k.stride(1) == v.stride(1) == pool_k.shape[2]
            and pool_k.is_contiguous()
            and pool_v.is_contiguous()
            and slots.dtype == torch.int64
            and slots.is_contiguous()
        )
        if not takes:
            pool_k.index_copy_(0, slots, k.to(pool_k.dtype))
            pool_v.index_copy_(0, slots, v.to(pool_v.dtype))
            return
        failed = self._write_kv[k.dtype](
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            pool_k.data_ptr(),
            pool_v.data_ptr(),
            slots.data_ptr(),
            slots.numel(),
            width,
            pool_k.shape[0],
        )
        if failed:  # as index_copy_ would
            raise IndexError(f"a KV slot outside the pool's {pool_k.shape[0]} slots")

    @staticmethod
    def _check(failed: int, name: str) -> None:
        if failed:
            raise RuntimeError(f"the compiled {name} kernel refused its arguments")


def load_layer_ops(cache_dir: Path, cpu_key: str) -> tuple[CpuLayerOps | None, str]:
    """(the ops, how they were got) or (None, why not); see `_native.load_library`."""
    loaded, how = load_library(cache_dir, cpu_key, "layer_ops")
    return (CpuLayerOps(loaded) if loaded is not None else None), how
