"""bf16 linears with their weights packed once for oneDNN, instead of at every call.

NOTE: on a CPU, torch's bf16 `F.linear` runs oneDNN's matmul, which first reorders the
weight into its blocked layout, on every call. Packed once at load
(`torch.ops.mkldnn._reorder_linear_weight`), the same kernel gives the same bits
(checked by the tests), faster: SmolLM2's linears of one step, timed alone with their
weights in cache (2 cores, one run), took 9.4 vs 16.6 ms at one row (a layer's four:
219 vs 503 us) and 31.1 vs 46.1 ms at 32 rows. float32
packing is faster too, but it leaves MKL's GEMM for oneDNN's, whose last bits differ,
so float32 keeps `F.linear` and its exact parity with transformers.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinear", "pack_linears_", "packing_available"]


def packing_available() -> bool:
    """Whether this torch has oneDNN's packed-linear ops and this CPU its bf16 path
    (AVX512-BW/VL/DQ or AVX-NE-CONVERT: an AVX2-only CPU keeps `F.linear`)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
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
    """An `nn.Linear` whose weight is packed for oneDNN; the same outputs, faster."""

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


def pack_linears_(model: nn.Module) -> int:
    """Swap every bf16 `nn.Linear` of `model` (LM head included) for a `PackedLinear`;
    returns how many. A head tied to the embedding gets its own packed copy (the
    embedding keeps the plain weight it looks rows up in)."""
    # (parent, name) first: holding the linears themselves would keep every plain
    # weight alive until the last is packed, twice the weights' memory at the peak
    targets = [
        (module, attr)
        for module in model.modules()
        for attr, child in module.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
    ]
    for module, attr in targets:
        setattr(module, attr, PackedLinear(getattr(module, attr)))
    return len(targets)
