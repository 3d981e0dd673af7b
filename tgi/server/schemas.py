"""HTTP request and response bodies, shaped as TGI's OpenAPI document shapes them.

Incoming models convert to the router's records with `to_client_parameters`; outgoing
models are built from router events with `from_event` classmethods.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from tgi.router.request import FinalEvent, GeneratedToken, PrefillToken, TokenEvent
from tgi.router.validation import ClientParameters

__all__ = [
    "CompatGenerateRequest",
    "Details",
    "ErrorResponse",
    "GenerateParameters",
    "GenerateRequest",
    "GenerateResponse",
    "PrefillTokenOut",
    "SimpleToken",
    "StreamDetails",
    "StreamResponse",
    "TokenOut",
]


class GenerateParameters(BaseModel):
    """TGI's `GenerateParameters`; ranges are checked by the router's validator so the
    messages match TGI's word for word."""

    adapter_id: str | None = None
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)  # TGI's seed is a u64
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    # vLLM's extension, not in TGI's schema: keep generating past EOS (fixed-length benchmarks)
    ignore_eos: bool = False

    def to_client_parameters(self) -> ClientParameters:
        return ClientParameters(
            do_sample=self.do_sample,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            typical_p=self.typical_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
            truncate=self.truncate,
            best_of=self.best_of,
            top_n_tokens=self.top_n_tokens,
            watermark=self.watermark,
            decoder_input_details=self.decoder_input_details,
            return_full_text=self.return_full_text,
            grammar=self.grammar,
            adapter_id=self.adapter_id,
            ignore_eos=self.ignore_eos,
        )


class GenerateRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class ErrorResponse(BaseModel):
    error: str
    error_type: str


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: TGI serialises a NaN logprob as null."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool

    @field_serializer("logprob")
    def _logprob(self, value: float | None) -> float | None:
        return _finite_or_none(value)

    @classmethod
    def from_token(cls, token: GeneratedToken) -> TokenOut:
        return cls(id=token.id, text=token.text, logprob=token.logprob, special=token.special)


class PrefillTokenOut(BaseModel):
    id: int
    text: str
    logprob: float | None

    @field_serializer("logprob")
    def _logprob(self, value: float | None) -> float | None:
        return _finite_or_none(value)

    @classmethod
    def from_token(cls, token: PrefillToken) -> PrefillTokenOut:
        return cls(id=token.id, text=token.text, logprob=token.logprob)


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillTokenOut]
    tokens: list[TokenOut]

    @classmethod
    def from_event(cls, event: FinalEvent) -> Details:
        return cls(
            finish_reason=event.finish_reason.value,
            generated_tokens=event.generated_tokens,
            seed=event.seed,
            prefill=[PrefillTokenOut.from_token(token) for token in event.prefill],
            tokens=[TokenOut.from_token(token) for token in event.tokens],
        )


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"generated_text": "test"}})

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    input_length: int
    seed: int | None


class StreamResponse(BaseModel):
    index: int
    token: TokenOut
    top_tokens: list[TokenOut] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None

    @classmethod
    def from_event(cls, event: TokenEvent | FinalEvent, *, details: bool) -> StreamResponse:
        response = cls(index=event.index, token=TokenOut.from_token(event.token))
        if isinstance(event, FinalEvent):
            response.generated_text = event.generated_text
            if details:
                response.details = StreamDetails(
                    finish_reason=event.finish_reason.value,
                    generated_tokens=event.generated_tokens,
                    input_length=event.input_length,
                    seed=event.seed,
                )
        return response


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int
