"""Rotary position embeddings for the Llama family, with HF's `rope_scaling` variants.

The inverse frequencies follow transformers' `modeling_rope_utils` (default, linear,
llama3, yarn) so logits match the reference implementation on the same weights.
`dynamic` NTK scaling changes the frequencies with the sequence length, which a batch of
rows at different lengths cannot share; it is refused rather than silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tgi.errors import ConfigError

__all__ = ["RopeSpec", "Rotary", "apply_rotary"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """What the rotary frequencies depend on; parsed from an HF config."""

    theta: float  # base wavelength
    rotary_dim: int  # leading head dims that rotate (head_dim * partial_rotary_factor)
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    params: tuple[tuple[str, Any], ...] = ()  # the scaling dict, as sorted items
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], head_dim: int) -> RopeSpec:
        """Read `rope_theta` + `rope_scaling` (4.x configs) or `rope_parameters` (5.x)."""
        scaling = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = float(scaling.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
        rope_type = str(scaling.pop("rope_type", None) or scaling.pop("type", None) or "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope scaling {rope_type!r} is not supported by tgi's Llama model "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        partial = float(
            scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        )
        return cls(
            theta=theta,
            rotary_dim=int(head_dim * partial),
            rope_type=rope_type,
            params=tuple(sorted(scaling.items())),
            max_position_embeddings=config.get("max_position_embeddings"),
        )

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [rotary_dim / 2] (float32) and the cos/sin scale."""
        dim, base, params = self.rotary_dim, self.theta, dict(self.params)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        inv_freq = 1.0 / (base**exponents)
        if self.rope_type == "linear":
            return inv_freq / float(params["factor"]), 1.0
        if self.rope_type == "llama3":
            return _llama3(inv_freq, params), 1.0
        if self.rope_type == "yarn":
            return _yarn(dim, base, params, self.max_position_embeddings)
        return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(
    dim: int, base: float, params: Mapping[str, Any], max_positions: int | None
) -> tuple[torch.Tensor, float]:
    original = int(params.get("original_max_position_embeddings") or max_positions or 0)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else float(max_positions or original) / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency per dim
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class Rotary:
    """cos/sin tables for arbitrary positions, computed per step from `inv_freq`.

    Per step rather than cached up to max positions: a flat batch of N tokens needs an
    [N, rotary_dim] table, which is one outer product; a cache would need a gather anyway.
    """

    def __init__(self, spec: RopeSpec, device: torch.device | str | None = None) -> None:
        inv_freq, self.scale = spec.inv_freq()
        self.inv_freq = inv_freq if device is None else inv_freq.to(device)  # [rd / 2] fp32
        self.rotary_dim = spec.rotary_dim

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, 1, rotary_dim] in `dtype` for `apply_rotary`.

        cos has its halves repeated as HF's; sin carries rotate_half's sign, [-sin, sin],
        so that the rotation is one multiply-add over the whole head.
        """
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [N, rd/2]
        cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by `Rotary.cos_sin` tables [N, 1, rotary_dim].

    HF's rotate_half form, x * cos + rotate_half(x) * sin, in three ops: rotate_half(x)
    is [-x2, x1]; swapping the halves gives [x2, x1] and the sign sits in the sin table.
    A decode step runs this once per layer, so the op count is what it costs.
    """
    rotary_dim = cos.shape[-1]
    rot = x[..., :rotary_dim]
    swapped = rot.unflatten(-1, (2, rotary_dim // 2)).flip(-2).flatten(-2)  # [x2, x1]
    out = torch.addcmul(rot * cos, swapped, sin)
    if rotary_dim < x.shape[-1]:  # partial rotary: the other dims pass through
        out = torch.cat((out, x[..., rotary_dim:]), dim=-1)
    return out
