"""Per-request sampling parameters, as the sampler consumes them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingParams"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to choose each next token. Neutral values leave the logits untouched."""

    do_sample: bool = False
    temperature: float = 1.0  # 1.0: no scaling
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0  # every sampled request has one (random when the client gave none)
