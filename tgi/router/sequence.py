"""The router's record of one request while it waits, runs and finishes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tgi.router.detokenizer import IncrementalDetokenizer
from tgi.router.request import (
    FinalEvent,
    FinishReason,
    GeneratedToken,
    GenerationRequest,
    PrefillToken,
)
from tgi.router.stopping import StopChecker

if TYPE_CHECKING:
    from tgi.router.request import Event

__all__ = ["SequenceState", "TokenizerLike", "top_tokens_of"]


class TokenizerLike(Protocol):
    """The tokenizer calls the router makes (a transformers tokenizer has them all)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass(slots=True, eq=False)  # eq=False: membership tests compare identity
class SequenceState:
    seq_id: int
    request: GenerationRequest
    events: asyncio.Queue[Event]
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    arrival_s: float
    scheduled_s: float | None = None
    tokens: list[GeneratedToken] = field(default_factory=list)
    top_tokens: list[tuple[GeneratedToken, ...]] = field(default_factory=list)  # if asked
    prefill: tuple[PrefillToken, ...] = ()
    cancelled: bool = False  # the client went away
    done: bool = False  # a final or error event was sent
    in_flight: int = 0  # rows planned that will bring a token, whose results are not in yet
    admitted_step: int = 0  # the step whose plan last handed it to the backend

    @classmethod
    def create(
        cls,
        *,
        seq_id: int,
        request: GenerationRequest,
        tokenizer: TokenizerLike,
        eos_token_ids: frozenset[int],
        arrival_s: float,
    ) -> SequenceState:
        return cls(
            seq_id=seq_id,
            request=request,
            events=asyncio.Queue(),
            detokenizer=IncrementalDetokenizer(tokenizer, request.input_ids),
            stop=StopChecker(request.stopping, eos_token_ids),
            arrival_s=arrival_s,
        )

    @property
    def max_total_tokens(self) -> int:
        """The KV this sequence may grow to: prompt plus every allowed new token."""
        return len(self.request.input_ids) + self.request.stopping.max_new_tokens

    @property
    def next_position(self) -> int:
        """Position of the token the next decode feeds: the last one generated, or the
        one a step still in flight will bring (`in_flight`)."""
        return len(self.request.input_ids) + len(self.tokens) + self.in_flight - 1

    @property
    def recompute_tokens(self) -> tuple[int, ...]:
        """What a (re)admission prefills: the prompt and every generated token but the
        pending one (which its next decode row feeds)."""
        return self.request.input_ids + tuple(token.id for token in self.tokens[:-1])

    @property
    def num_computed(self) -> int:
        """len(recompute_tokens), without building it."""
        return len(self.request.input_ids) + max(len(self.tokens) - 1, 0)

    @property
    def needs_rows(self) -> bool:
        """Whether another row may still change its output: False once the tokens in
        hand and in flight reach max_new_tokens."""
        return len(self.tokens) + self.in_flight < self.request.stopping.max_new_tokens

    def record(self, token: GeneratedToken, top: tuple[GeneratedToken, ...] = ()) -> None:
        self.tokens.append(token)
        if self.request.top_n_tokens:
            self.top_tokens.append(top)

    def final_event(self, tokenizer: TokenizerLike, reason: FinishReason, now: float) -> FinalEvent:
        ids = [token.id for token in self.tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if self.request.return_full_text:
            text = self.request.inputs + text
        scheduled = self.scheduled_s if self.scheduled_s is not None else now
        sampling = self.request.sampling
        return FinalEvent(
            index=len(self.tokens),
            token=self.tokens[-1],
            generated_text=text,
            finish_reason=reason,
            generated_tokens=len(self.tokens),
            input_length=len(self.request.input_ids),
            seed=sampling.seed if sampling.do_sample else None,
            tokens=tuple(self.tokens),
            prefill=self.prefill,
            queued_s=scheduled - self.arrival_s,
            inference_s=now - scheduled,
            top_tokens=tuple(self.top_tokens),
        )


def top_tokens_of(
    tokenizer: TokenizerLike, special_ids: frozenset[int], pairs: list[tuple[int, float]]
) -> tuple[GeneratedToken, ...]:
    """A step's top-n (id, logprob) pairs as tokens; each text is that token decoded
    alone, special tokens kept, as TGI's `batch_decode` of the ids does."""
    return tuple(
        GeneratedToken(token_id, tokenizer.decode([token_id]), logprob, token_id in special_ids)
        for token_id, logprob in pairs
    )
