"""HTTP request and response bodies, shaped as TGI's OpenAPI document shapes them.

Incoming models convert to the router's records with `to_client_parameters`; outgoing
models are built from router events with `from_event` classmethods.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from tgi.router.request import FinalEvent, GeneratedToken, PrefillToken, TokenEvent
from tgi.router.validation import ClientParameters

__all__ = [
    "F32",
    "I32",
    "U32",
    "U64",
    "BestOfSequence",
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


# TGI's Rust types (router/src/lib.rs), which its serde refuses to overflow or coerce: a
# value they cannot hold is a 422 when the body is parsed, before validation runs. usize
# is a u64 on the 64-bit servers TGI runs on; a JSON integer is a fine f32.
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
_F32_MAX = 3.4028234663852886e38
F32 = Annotated[float, Field(allow_inf_nan=False, ge=-_F32_MAX, le=_F32_MAX)]
# No coercion ("10" is no integer, "yes" no boolean), as serde; JSON has no tuples, sets
# or bytes, so strict mode refuses nothing a JSON client could mean.
_STRICT = ConfigDict(strict=True)


class GenerateParameters(BaseModel):
    """TGI's `GenerateParameters`, with TGI's types; ranges within them are checked by
    the router's validator so the messages match TGI's word for word. An explicit `null`
    means "not given"."""

    model_config = _STRICT

    adapter_id: str | None = None
    best_of: U64 | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: F32 | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: U32 | None = None
    repetition_penalty: F32 | None = None
    return_full_text: bool | None = None
    seed: U64 | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: F32 | None = None
    top_k: I32 | None = None
    top_n_tokens: U32 | None = None
    top_p: F32 | None = None
    truncate: U64 | None = None
    typical_p: F32 | None = None
    watermark: bool = False
    # vLLM's extension, not in TGI's schema: keep generating past EOS (fixed-length benchmarks)
    ignore_eos: bool = False

    @field_validator(
        "decoder_input_details", "details", "do_sample", "watermark", "ignore_eos", mode="before"
    )
    @classmethod
    def _null_is_false(cls, value: object) -> object:
        return False if value is None else value

    @field_validator("stop", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @property
    def wants_details(self) -> bool:
        """TGI answers with details when either flag asks (router/src/server.rs)."""
        return self.details or self.decoder_input_details

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
    model_config = _STRICT

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)

    @model_validator(mode="before")
    @classmethod
    def _default_parameters(cls, data: Any) -> Any:
        # TGI's `default_parameters()` (router/src/lib.rs): a request without `parameters`
        # samples (do_sample = true); an empty `parameters` object does not.
        if isinstance(data, dict) and data.get("parameters") is None:
            return {**data, "parameters": {"do_sample": True}}
        return data


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


def _without(keys: tuple[str, ...], data: dict[str, Any], empty: tuple[object, ...]) -> dict:
    """`data` less the `keys` whose value is in `empty` (serde's skip_serializing_if)."""
    return {k: v for k, v in data.items() if not (k in keys and any(v == e for e in empty))}


def _top_tokens(steps: tuple[tuple[GeneratedToken, ...], ...]) -> list[list[TokenOut]]:
    return [[TokenOut.from_token(token) for token in step] for step in steps]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillTokenOut]
    tokens: list[TokenOut]
    top_tokens: list[list[TokenOut]] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _skip_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without(("top_tokens",), handler(self), ([],))

    @classmethod
    def from_event(cls, event: FinalEvent) -> BestOfSequence:
        return cls(
            generated_text=event.generated_text,
            finish_reason=event.finish_reason.value,
            generated_tokens=event.generated_tokens,
            seed=event.seed,
            prefill=[PrefillTokenOut.from_token(token) for token in event.prefill],
            tokens=[TokenOut.from_token(token) for token in event.tokens],
            top_tokens=_top_tokens(event.top_tokens),
        )


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillTokenOut]
    tokens: list[TokenOut]
    best_of_sequences: list[BestOfSequence] | None = None
    top_tokens: list[list[TokenOut]] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _skip_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without(("best_of_sequences", "top_tokens"), handler(self), (None, []))

    @classmethod
    def from_event(
        cls, event: FinalEvent, best_of_sequences: list[FinalEvent] | None = None
    ) -> Details:
        return cls(
            finish_reason=event.finish_reason.value,
            generated_tokens=event.generated_tokens,
            seed=event.seed,
            prefill=[PrefillTokenOut.from_token(token) for token in event.prefill],
            tokens=[TokenOut.from_token(token) for token in event.tokens],
            best_of_sequences=None
            if best_of_sequences is None
            else [BestOfSequence.from_event(other) for other in best_of_sequences],
            top_tokens=_top_tokens(event.top_tokens),
        )


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"generated_text": "test"}})

    generated_text: str
    details: Details | None = None

    @model_serializer(mode="wrap")
    def _skip_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without(("details",), handler(self), (None,))


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

    @model_serializer(mode="wrap")
    def _skip_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without(("top_tokens",), handler(self), ([],))

    @classmethod
    def from_event(cls, event: TokenEvent | FinalEvent, *, details: bool) -> StreamResponse:
        top = event.top_tokens if isinstance(event, TokenEvent) else event.last_top_tokens
        response = cls(
            index=event.index,
            token=TokenOut.from_token(event.token),
            top_tokens=[TokenOut.from_token(token) for token in top],
        )
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
