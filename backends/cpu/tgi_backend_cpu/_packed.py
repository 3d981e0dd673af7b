"""Linears with their weights packed once for oneDNN, instead of at every call.

NOTE: on a CPU, torch's bf16 `F.linear` runs oneDNN's matmul, which first reorders the
weight into its blocked layout, on every call. Packed once at load
(`torch.ops.mkldnn._reorder_linear_weight`), the same kernel gives the same bits
(checked by the tests), faster: SmolLM2's linears of one step, timed alone with their
weights in cache (2 cores, one run), took 9.4 vs 16.6 ms at one row (a layer's four:
219 vs 503 us) and 31.1 vs 46.1 ms at 32 rows.

float32 `F.linear` runs MKL's GEMM instead, which on AMD CPUs takes a slow generic path:
on 2 cores of an AMD EPYC (Zen 5) one step's SmolLM2 linears took 82.1 ms at 32 rows in
MKL against 29.8 ms packed for oneDNN (15.6 against 9.2 ms at one row; 2571 against
1147 ms for 1536 rows); on an Intel Xeon with AMX oneDNN was ~12% faster. So float32 is
packed too. Its last bits differ from MKL's (and from transformers' CPU path, which is
MKL's): ~1e-6 of the values, which moves greedy output only at a near-tie.
`--backend-option onednn_float32=false` keeps `F.linear` and MKL's exact bits (the
compiled attention and layer ops have their own flags, `decode_kernel` and
`layer_kernels`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PACKED_DTYPES", "PackedLinear", "pack_linears_", "packing_available"]


PACKED_DTYPES = (torch.bfloat16, torch.float32)


def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch has oneDNN's packed-linear ops for `dtype`: float32 wherever
    oneDNN is built in, bf16 where the CPU has its path too (AVX512-BW/VL/DQ or
    AVX-NE-CONVERT: an AVX2-only CPU keeps `F.linear`)."""
    ops = torch.ops.mkldnn
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    ):
        return False
    if dtype == torch.float32:
        return True
    return (
        dtype == torch.bfloat16
        and hasattr(ops, "_is_mkldnn_bf16_supported")
        and bool(ops._is_mkldnn_bf16_supported())
    )


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [N, in] and a weight packed by `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight is packed for oneDNN: faster; in bf16 the same bits."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_weight(linear.weight)  # not a parameter: an opaque layout
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = packed_linear(flat, self.packed, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every `nn.Linear` of `model` whose weight is `dtype` (LM head included) for a
    `PackedLinear`; returns how many. A head tied to the embedding gets its own packed
    copy (the embedding keeps the plain weight it looks rows up in)."""
    if dtype not in PACKED_DTYPES:
        raise ValueError(f"oneDNN linears are packed in {PACKED_DTYPES}, not {dtype}")
    # (parent, name) first: holding the linears themselves would keep every plain
    # weight alive until the last is packed, twice the weights' memory at the peak
    targets = [
        (module, attr)
        for module in model.modules()
        for attr, child in module.named_children()
        if type(child) is nn.Linear and child.weight.dtype == dtype
    ]
    for module, attr in targets:
        setattr(module, attr, PackedLinear(getattr(module, attr)))
    return len(targets)
