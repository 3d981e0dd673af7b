"""Validated requests and the events the router sends back for them.

These records cross the server/router boundary: the server builds a
`GenerationRequest` from the HTTP body (through `tgi.router.validation`), the router
answers with a stream of `TokenEvent`s closed by one `FinalEvent` or an `ErrorEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tgi.sampling.params import SamplingParams

__all__ = [
    "ErrorEvent",
    "Event",
    "FinalEvent",
    "FinishReason",
    "GeneratedToken",
    "GenerationRequest",
    "PrefillToken",
    "SamplingParams",
    "StoppingParams",
    "TokenEvent",
]


class FinishReason(str, Enum):
    """Why a sequence stopped, spelled as TGI's API spells it."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True, slots=True)
class StoppingParams:
    """When to stop a sequence."""

    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks ask for fixed output lengths


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A request the router can run: tokenized, truncated, every limit checked."""

    inputs: str  # the prompt text as the client sent it
    input_ids: tuple[int, ...]  # after truncation; len() is the input length
    sampling: SamplingParams
    stopping: StoppingParams
    decoder_input_details: bool = False  # return prompt tokens with their logprobs
    return_full_text: bool = False  # prepend `inputs` to generated_text

    @property
    def top_n_tokens(self) -> int:
        return self.sampling.top_n_tokens


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    """One generated token as the API reports it."""

    id: int
    text: str  # the text this token added; "" while a UTF-8 character is incomplete
    logprob: float
    special: bool


@dataclass(frozen=True, slots=True)
class PrefillToken:
    """One prompt token with its logprob (None for the first, which has no context)."""

    id: int
    text: str
    logprob: float | None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A token was generated; the sequence goes on."""

    index: int  # 1-based count of generated tokens, as TGI's stream `index`
    token: GeneratedToken
    top_tokens: tuple[GeneratedToken, ...] = ()  # the step's most likely tokens, when asked


@dataclass(frozen=True, slots=True)
class FinalEvent:
    """The last token of a sequence, with everything the full response needs."""

    index: int
    token: GeneratedToken
    generated_text: str  # includes the prompt when return_full_text was asked
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int
    seed: int | None  # the seed used when sampling, else None
    tokens: tuple[GeneratedToken, ...]  # every generated token, in order
    prefill: tuple[PrefillToken, ...]  # prompt tokens when decoder_input_details
    queued_s: float  # time from arrival to first scheduled step
    inference_s: float  # time from first scheduled step to the end
    # per generated token, its step's most likely tokens; () when top_n_tokens was 0
    top_tokens: tuple[tuple[GeneratedToken, ...], ...] = ()

    @property
    def last_top_tokens(self) -> tuple[GeneratedToken, ...]:
        """The last step's top tokens (what the stream's final event carries)."""
        return self.top_tokens[-1] if self.top_tokens else ()

    @property
    def mean_logprob(self) -> float:
        """Mean logprob of the generated tokens: how TGI ranks `best_of` candidates."""
        if not self.tokens:
            return float("-inf")
        return sum(token.logprob for token in self.tokens) / len(self.tokens)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Generation failed for this request; the server reports it to the client."""

    message: str
    error_type: str = "generation"


# What a request's stream yields: tokens, then one final or error event.
Event = TokenEvent | FinalEvent | ErrorEvent
