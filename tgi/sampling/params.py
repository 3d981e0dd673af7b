"""Per-request sampling parameters, as the sampler consumes them.

Plain data only: `SamplingParams` travels inside step plans, which may cross a process
boundary. A grammar travels as its canonical source (`GrammarSpec`); the sampler
compiles it where it runs, through the compiler's LRU (validation compiled it once
already, so a bad grammar is refused before the request is queued).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GrammarSpec", "SamplingParams"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A validated grammar as text: what `GrammarCompiler.compile_spec` turns back into
    a `CompiledGrammar` (a cache hit where validation ran in the same process)."""

    kind: str  # "json" or "regex" ("json_schema" compiles as "json")
    source: str  # canonical text of the grammar: the compiler's cache key


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
    grammar: GrammarSpec | None = None  # constrain the output (JSON schema or regex)

    @property
    def needs_history(self) -> bool:
        """Whether sampling this row reads its token history (prompt + generated)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.watermark

    def non_default_fields(self) -> tuple[str, ...]:
        """Names of the fields that differ from their neutral value (what a backend that
        samples on its device must honour for this request)."""
        neutral = _NEUTRAL
        names = [
            name
            for name in _FIELDS
            if name not in ("seed", "watermark_gamma", "watermark_delta")
            and getattr(self, name) != getattr(neutral, name)
        ]
        if self.do_sample and "seed" not in names:
            names.append("seed")
        return tuple(names)


_NEUTRAL = SamplingParams()
_FIELDS = tuple(SamplingParams.__dataclass_fields__)
