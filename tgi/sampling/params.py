"""Per-request sampling parameters, as the sampler consumes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tgi.sampling.grammar import CompiledGrammar

__all__ = ["SamplingParams"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to choose each next token. Neutral values leave the logits untouched."""

    do_sample: bool = False
    temperature: float = 1.0  # 1.0: no scaling
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0  # every sampled request has one (random when the client gave none)
    typical_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already seen
    frequency_penalty: float = 0.0  # 0.0: off; subtracts penalty * count / length
    watermark: bool = False  # bias each step towards a green list (Kirchenbauer et al.)
    watermark_gamma: float = 0.5  # fraction of the vocabulary that is green
    watermark_delta: float = 2.0  # logit bias added to green tokens
    top_n_tokens: int = 0  # also return this many most likely tokens per step
    grammar: CompiledGrammar | None = None  # constrain the output (JSON schema or regex)

    @property
    def needs_history(self) -> bool:
        """Whether sampling this row reads its token history (prompt + generated)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.watermark
