"""Weight-only int8/int4 quantization of `nn.Linear`, on torch's own CPU kernels.

Why: one decode step of a small model on a CPU reads every weight once, so its speed
is memory bandwidth over weight bytes. Storing weights as int8 (1 byte) or int4
(half a byte, plus a scale and zero per group) and dequantizing inside the matmul
kernel cuts those bytes by 4x or ~6x; activations stay float (fp32 or bf16).

Kernels (torch >= 2.6, CPU):
- int8: `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]`,
  per-output-channel symmetric scales (w ~= q * scale).
- int4: `aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, 1)`
  -> uint8 [N, K/2], and `aten._weight_int4pack_mm_for_cpu(x, packed, group,
  scale_and_zero [K/group, N, 2])`, asymmetric per group of `group` input features
  with tinygemm's convention w ~= (q - 8) * scale + zero.

NOTE: the swapped modules keep the `nn.Linear` attribute names a loader or tensor
parallel slicer looks for (`in_features`, `out_features`, `bias`), but `weight` is
gone: the float copy is freed, which is the point. Quantize after loading weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "DEQUANT_MIN_ROWS",
    "INT4_GROUP_SIZE",
    "Int4Linear",
    "Int8Linear",
    "QuantMode",
    "int4_supported",
    "keep_prefill_weights_",
    "quantize_linear",
    "quantize_linears_",
    "quantize_tied_lm_head_",
    "quantize_weight",
    "weight_bytes",
]

QuantMode = Literal["int8", "int4"]
# Group size of int4 scales/zeros, measured with benchmarks/quant_kernels.py on
# SmolLM2's shapes: 32, 64 and 128 decode at the same speed (M = 1, ~8 ms of matmuls
# per token on one core); relative error on Gaussian weights is 0.078 / 0.090 / 0.10.
# 32 costs 0.625 bytes per weight (bf16 scale and zero per group), as llama.cpp's Q4_1.
INT4_GROUP_SIZE = 32
_INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_BLOCK_N = 64  # the CPU packer's row block, see `_unpack_int4`
_INT4_INNER_K_TILES = 1  # the CPU packer ignores tiling but the op still takes it
# The kernels are vectorized (AVX512/AVX2) for bfloat16 and float16 activations only; with
# float32 ones torch 2.13 runs a scalar loop 10-30x slower than fp32 `F.linear`. So a
# float32 input is rounded to bfloat16 for the kernel (bf16 keeps fp32's range; fp16
# is scalar again from M = 32 on) and the result cast back.
_KERNEL_DTYPE = torch.bfloat16
# From this many rows on (prefill, big decode batches), dequantizing the weight and
# calling `F.linear` beats the kernel, whose cost grows linearly in M: at K=576,
# N=3072 on one core, M=32 kernel 1.6 ms / dequant 2.0 ms, M=64 3.2 / 2.5, M=512 49 / 23.
DEQUANT_MIN_ROWS = 48
_INT4_MM = torch._weight_int4pack_mm_for_cpu  # the builtin: no Python frame per call


class _PrefillWeight:
    """The float weight the many-row path multiplies with: rebuilt per call, or kept.

    Kept (`keep_prefill_weights_`), prefill runs at float speed for the price of one
    float copy of the weights next to the quantized ones; decode still reads only the
    quantized bytes, which is where weight-only quantization pays on a CPU.
    """

    keep_prefill_weight: bool = False
    _prefill_weights: dict[torch.dtype, torch.Tensor]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def prefill_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.keep_prefill_weight:
            return self.dequantized(dtype)
        cache = self.__dict__.setdefault("_prefill_weights", {})
        if dtype not in cache:
            cache[dtype] = self.dequantized(dtype)
        return cache[dtype]


class Int8Linear(_PrefillWeight, nn.Module):
    """`y = x @ (q * scale).T + bias` with an int8 weight and one scale per output row."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # bf16 [N]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a [N, K] weight (left as it is) into a new layer."""
        weight = weight.detach().float()  # [N, K]
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        # Kept in the kernel's dtype only: both paths then compute with the same weight.
        return cls(qweight.contiguous(), scales.to(_KERNEL_DTYPE), _detached(bias))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer computes with."""
        return (self.qweight.to(dtype) * self.scales.to(dtype)[:, None]).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x2.shape[0] >= DEQUANT_MIN_ROWS:
            return F.linear(x, self.prefill_weight(x.dtype), _cast(self.bias, x.dtype))
        if x.dtype in (torch.float32, _KERNEL_DTYPE):
            x2, scales = x2.to(_KERNEL_DTYPE), self.scales
        else:
            scales = self.scales.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, scales)
        return _finish(y, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(_PrefillWeight, nn.Module):
    """Group-wise asymmetric int4 weight in torch's packed CPU layout."""

    packed: torch.Tensor
    scale_and_zero: torch.Tensor

    def __init__(
        self,
        packed: torch.Tensor,
        scale_and_zero: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        in_features: int,
        group_size: int,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = packed.shape[0]
        self.group_size = group_size
        self.register_buffer("packed", packed)  # uint8 [N, K/2]
        self.register_buffer("scale_and_zero", scale_and_zero)  # bf16 [K/group, N, 2]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        return cls.from_weight(linear.weight, linear.bias, group_size)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = INT4_GROUP_SIZE,
    ) -> Int4Linear:
        """Quantize a [N, K] weight (left as it is) into a new layer."""
        out_features, in_features = weight.shape
        if not int4_supported(in_features, out_features, group_size):
            raise ValueError(
                f"int4 needs in_features ({in_features}) divisible by a group size in "
                f"{_INT4_GROUP_SIZES} (got {group_size}) and out_features ({out_features}) "
                f"divisible by {_INT4_BLOCK_N}"
            )
        groups = weight.detach().float().reshape(out_features, -1, group_size)
        low = groups.amin(dim=-1, keepdim=True)  # [N, K/g, 1]
        high = groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15.0).clamp(min=1e-8)
        q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32)
        # tinygemm stores the value of q == 8 as "zero": w = (q - 8) * scale + zero.
        zero = low + 8.0 * scale
        q = q.reshape(out_features, in_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)
        if not torch.equal(_unpack_int4(packed), q.to(torch.uint8)):
            raise RuntimeError("torch's int4 CPU packing changed layout; update _unpack_int4")
        sz = torch.cat([scale, zero], dim=-1).transpose(0, 1)  # [K/g, N, 2]
        scale_and_zero = sz.to(_KERNEL_DTYPE).contiguous()  # the kernel ignores strides
        return cls(
            packed,
            scale_and_zero,
            _detached(bias),
            in_features=in_features,
            group_size=group_size,
        )

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer computes with."""
        n, k, g = self.out_features, self.in_features, self.group_size
        q = _unpack_int4(self.packed).to(dtype).reshape(n, k // g, g)
        scale, zero = self.scale_and_zero.to(dtype).transpose(0, 1).unbind(-1)  # [N, K/g]
        # (q - 8) * scale + zero, in one pass over the weight
        offset = zero - 8.0 * scale
        return torch.addcmul(offset[..., None], q, scale[..., None]).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The decode hot path (bf16 rows, no bias): the kernel call and nothing around it.
        fast = x.dtype is _KERNEL_DTYPE and x.dim() == 2 and self.bias is None
        if fast and x.shape[0] < DEQUANT_MIN_ROWS:
            return _INT4_MM(x.contiguous(), self.packed, self.group_size, self.scale_and_zero)
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x2.shape[0] >= DEQUANT_MIN_ROWS:
            return F.linear(x, self.prefill_weight(x.dtype), _cast(self.bias, x.dtype))
        if x.dtype in (torch.float32, _KERNEL_DTYPE):
            x2, scale_and_zero = x2.to(_KERNEL_DTYPE), self.scale_and_zero
        else:
            scale_and_zero = self.scale_and_zero.to(x.dtype)
        y = _INT4_MM(x2.contiguous(), self.packed, self.group_size, scale_and_zero)
        return _finish(y, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 group_size={self.group_size}"
        )


def int4_supported(in_features: int, out_features: int, group_size: int = INT4_GROUP_SIZE) -> bool:
    """Whether the int4 CPU kernel (and `_unpack_int4`) can hold a [out, in] weight."""
    return (
        group_size in _INT4_GROUP_SIZES
        and in_features % group_size == 0
        and out_features % _INT4_BLOCK_N == 0
    )


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Undo `_convert_weight_to_int4pack_for_cpu`: uint8 [N, K/2] -> uint8 [N, K] in 0..15.

    NOTE: the packer (torch 2.13, found by probing) writes rows in blocks of 64; a
    block's bytes, read as [K, 32], hold row j of the block in the low nibble and row
    32 + j in the high nibble of column j:

        block b = rows 64b..64b+63    byte [k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4
    """
    n, half_k = packed.shape
    k = 2 * half_k
    blocks = packed.reshape(n // _INT4_BLOCK_N, k, _INT4_BLOCK_N // 2)  # [N/64, K, 32]
    nibbles = torch.stack([blocks & 15, blocks >> 4], dim=1)  # [N/64, 2, K, 32]
    return nibbles.transpose(2, 3).reshape(n, k)


def _cast(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias.to(dtype)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """Kernel output [M, N] -> x's dtype and leading shape, plus bias."""
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _detached(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().float().clone()


def quantize_linear(
    linear: nn.Linear, mode: QuantMode, *, group_size: int = INT4_GROUP_SIZE
) -> Int8Linear | Int4Linear:
    """A quantized replacement for `linear`; `linear` itself is left untouched."""
    return quantize_weight(linear.weight, mode, bias=linear.bias, group_size=group_size)


def quantize_weight(
    weight: torch.Tensor,
    mode: QuantMode,
    *,
    bias: torch.Tensor | None = None,
    group_size: int = INT4_GROUP_SIZE,
) -> Int8Linear | Int4Linear:
    """A quantized layer computing `x @ weight.T + bias`; `weight` [N, K] is left untouched.

    For a lm_head tied to the embedding table, pass the table: the embedding keeps
    its float rows for the gather, the head gets its own quantized copy.
    int4 uses the largest group size <= `group_size` that divides K; a weight no
    group size divides, or whose N is not a multiple of 64, falls back to int8
    (logged): the int4 kernel packs whole groups and 64-row blocks only.
    """
    _check_mode(mode)
    out_features, in_features = weight.shape
    if mode == "int4":
        # A smaller group that divides in_features is still int4; only then give up.
        for group in sorted((g for g in _INT4_GROUP_SIZES if g <= group_size), reverse=True):
            if int4_supported(in_features, out_features, group):
                return Int4Linear.from_weight(weight, bias, group)
        logger.info(
            "int4 cannot hold a %dx%d weight with group size %d; using int8 for it",
            out_features,
            in_features,
            group_size,
        )
    return Int8Linear.from_weight(weight, bias)


def quantize_linears_(
    module: nn.Module,
    mode: QuantMode,
    *,
    skip: Callable[[str], bool] | None = None,
    group_size: int = INT4_GROUP_SIZE,
) -> None:
    """Replace, in place, every `nn.Linear` under `module` with a quantized one.

    `skip(qualified_name)` returning True keeps that layer in float (e.g. a tied
    lm_head, see `quantize_tied_lm_head_`). Each float weight is dropped as soon as
    its replacement exists, so peak memory grows by one layer, not one model.
    """
    _check_mode(mode)
    # Names only: holding the modules here would keep every float weight alive.
    targets = [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and name and not (skip is not None and skip(name))
    ]
    before = weight_bytes(module)
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, attr)
        setattr(parent, attr, quantize_linear(linear, mode, group_size=group_size))
        del linear
    logger.info(
        "quantized %d linear layers to %s: %.1f MB -> %.1f MB of weights",
        len(targets),
        mode,
        before / 1e6,
        weight_bytes(module) / 1e6,
    )


def keep_prefill_weights_(module: nn.Module) -> int:
    """Let every quantized layer under `module` keep the float weight its many-row path
    builds (see `_PrefillWeight`); returns how many layers will."""
    layers = [child for child in module.modules() if isinstance(child, _PrefillWeight)]
    for layer in layers:
        layer.keep_prefill_weight = True
    return len(layers)


def quantize_tied_lm_head_(
    model: nn.Module,
    mode: QuantMode,
    *,
    head_name: str = "lm_head",
    group_size: int = INT4_GROUP_SIZE,
) -> None:
    """Give `model.<head_name>` its own quantized weight, untying it from the embedding.

    With tied embeddings the lm_head's weight *is* the embedding table; the embedding
    stays a float gather (one row per token: cheap), while the head is a full
    [vocab, hidden] matmul per token, the largest single read of a small model.
    Costs an extra quantized copy of the table (~1/4 or ~1/6 of it). Use it after
    `quantize_linears_(model, mode, skip=...)` skipped the head; a model whose head
    is no `nn.Linear` (it multiplies by the table directly) wants `quantize_weight`.
    """
    head = model.get_submodule(head_name)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{head_name} is {type(head).__name__}, not nn.Linear")
    parent_name, _, attr = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, quantize_linear(head, mode, group_size=group_size))


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _check_mode(mode: str) -> None:
    if mode not in get_args(QuantMode):
        raise ValueError(
            f"unknown quantization mode {mode!r}; expected one of {get_args(QuantMode)}"
        )
