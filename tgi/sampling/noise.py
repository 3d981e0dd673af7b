"""Counter-based random numbers: the same (seed, step) gives the same noise anywhere.

NOTE: a stateful torch.Generator per request would force a Python loop over rows and
make a row's draws depend on the order rows were sampled. Hashing (seed, step, token id)
instead gives every row its own stream in one batched op, identical whatever else
shares the batch and on any device. The hash is SplitMix64's finalizer, written with
int64 ops (multiplication wraps; right shifts are masked to act as logical shifts).
"""

from __future__ import annotations

import torch

__all__ = ["keyed_uniform_at", "keyed_uniforms", "splitmix64", "uniform_noise"]


def _as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit constant as the signed int64 torch stores."""
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)
_STEP = _as_int64(0xD1B54A32D192ED03)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors: a well-mixed 64-bit hash of each value."""
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform floats in (0, 1), one per (row, token id).

    seeds, steps: [B] int64 on the target device. Returns [B, V] float32.
    """
    return keyed_uniforms(splitmix64(seeds * _GOLDEN + steps * _STEP), vocab_size)  # [B]


def keyed_uniforms(row_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform floats in (0, 1), one per (row, token id), a pure function of the row's key.

    row_keys: [B] int64. Returns [B, V] float32.
    """
    token_ids = torch.arange(vocab_size, device=row_keys.device, dtype=torch.int64)  # [V]
    bits = splitmix64(row_keys[:, None] + token_ids[None, :] * _GOLDEN)  # [B, V]
    # The top 24 bits fit a float32 mantissa exactly; +0.5 keeps the value off 0 and 1.
    return (_shift_right(bits, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def keyed_uniform_at(row_keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`keyed_uniforms(row_keys, V)[i, token_ids[i]]` without building the [B, V] tensor.

    row_keys, token_ids: [B] int64. Returns [B] float32.
    """
    bits = splitmix64(row_keys + token_ids * _GOLDEN)  # [B]
    return (_shift_right(bits, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
