"""`tgi.models.ops.LayerOps` by compiled calls (`csrc/layer_ops.c`), for bf16 models.

NOTE: one C call per op instead of several torch ops: residual add with RMSNorm, rotary
on q and k in place in the fused QKV output (no copy), SiLU-and-multiply, and the step's
KV write into the pool (used by `_paged_attention`). They round as the torch ops do, so
outputs match the torch path up to last-bit differences in exp and summation order
(the tests hold them to it). Tensors the kernels do not take (float32, odd strides,
rows wider than the C code's limit) go to the torch implementation.
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
_BF16 = torch.bfloat16


class CpuLayerOps(LayerOps):
    """The layer ops of `csrc/layer_ops.c` for bf16 tensors; torch's for the rest."""

    def __init__(self, loaded: NativeLibrary) -> None:
        library = loaded.library
        self.path: Path = loaded.path
        self.build_seconds = loaded.build_seconds
        self._norm = library.tgi_add_rms_norm_bf16
        self._norm.argtypes = [_P, _P, _P, _P, _P, _I, _I, _F, _I]
        self._rotary = library.tgi_rotary_bf16
        self._rotary.argtypes = [_P, _L, _I, _I, _I, _I, _P, _P, _I]
        self._silu_mul = library.tgi_silu_mul_bf16
        self._silu_mul.argtypes = [_P, _P, _I, _I, _I]
        self._write_kv = library.tgi_write_kv_bf16
        self._write_kv.argtypes = [_P, _L, _P, _L, _P, _P, _P, _I, _I, _L]
        for function in (self._norm, self._rotary, self._silu_mul, self._write_kv):
            function.restype = _I
        # id(norm) -> (norm, its weight in bf16); the norm is kept so an id is never reused
        self._weights: dict[int, tuple[RMSNorm, torch.Tensor]] = {}

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = hidden.shape[-1]
        takes = hidden.dtype == _BF16 and hidden.is_contiguous() and size <= MAX_NORM_SIZE
        if delta is not None:
            takes = takes and delta.dtype == _BF16 and delta.is_contiguous()
        if not takes:
            return super().add_rms_norm(hidden, delta, norm)
        held = self._weights.get(id(norm))
        if held is None:
            held = self._weights[id(norm)] = (norm, norm.weight.detach().to(_BF16).contiguous())
        weight = held[1]
        rows = hidden.numel() // size
        normed = torch.empty_like(hidden)
        summed = torch.empty_like(hidden) if delta is not None else hidden
        self._check(
            self._norm(
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
            x.dtype == cos.dtype == sin.dtype == _BF16
            and x.stride(2) == 1
            and x.stride(1) == head_dim
            and cos.is_contiguous()
            and sin.is_contiguous()
            and rotary_dim <= MAX_ROTARY_DIM
        )
        if not takes:
            return super().rotary(x, cos, sin)
        self._check(
            self._rotary(
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
        if gate_up.dtype != _BF16 or not gate_up.is_contiguous():
            return super().silu_mul(gate_up)
        rows, width = gate_up.shape
        out = gate_up.new_empty((rows, width // 2))
        self._check(
            self._silu_mul(
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
            k.dtype == v.dtype == pool_k.dtype == pool_v.dtype == _BF16
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
        failed = self._write_kv(
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
