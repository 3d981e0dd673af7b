"""/v1/completions: one or more prompts, as TGI's `completions` handler runs them.

A list of prompts (up to `max_client_batch_size`) runs as that many requests; each
choice's `index` is its prompt's. Mapping as for chat: `temperature: 0` is greedy;
`echo` is TGI's `return_full_text`; OpenAI's integer `logprobs` is `top_n_tokens`, and
the choice's `logprobs` is OpenAI's object (TGI's schema leaves it an unused array).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tgi.errors import InvalidRequest
from tgi.router.request import ErrorEvent, FinalEvent, GeneratedToken, TokenEvent
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters
from tgi.server.openai.common import (
    DONE,
    Identity,
    failure_event,
    finish_reason,
    finite,
    merged_events,
    sse,
)
from tgi.server.openai.schemas import CompletionRequest, Usage
from tgi.server.serving import KEEP_ALIVE

__all__ = ["check_prompts", "completion", "completion_parameters", "completion_stream"]


def check_prompts(body: CompletionRequest, max_client_batch_size: int) -> list[str]:
    prompts = body.prompts
    if not prompts:
        raise InvalidRequest("`prompt` cannot be empty")
    if len(prompts) > max_client_batch_size:
        raise InvalidRequest(
            # TGI's own message
            f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}"
        )
    return prompts


def completion_parameters(body: CompletionRequest) -> ClientParameters:
    """TGI's completion parameters, refusing what cannot be honoured."""
    if body.suffix is not None:
        # TGI's own message
        raise InvalidRequest(
            "Suffix is not supported and can be achieved by preprocessing the prompt."
        )
    if body.n is not None and body.n != 1:
        raise InvalidRequest("`n` must be 1: this server returns one choice per prompt")
    if body.best_of is not None and body.best_of != 1:
        raise InvalidRequest("`best_of` is not supported on /v1/completions: use /generate")
    if body.logit_bias:
        raise InvalidRequest("`logit_bias` is not supported")
    greedy = body.temperature == 0.0
    repetition = body.repetition_penalty
    if repetition is None and body.presence_penalty is not None:
        repetition = body.presence_penalty + 2.0  # as chat maps it
    return ClientParameters(
        do_sample=not greedy,
        max_new_tokens=body.max_tokens,
        temperature=None if greedy else body.temperature,
        top_p=None if body.top_p == 1.0 else body.top_p,
        repetition_penalty=repetition,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(body.stop),
        top_n_tokens=body.logprobs,
        return_full_text=body.echo,
        ignore_eos=body.ignore_eos,
    )


def _logprobs(
    tokens: tuple[GeneratedToken, ...],
    tops: tuple[tuple[GeneratedToken, ...], ...],
    offset: int,
) -> dict[str, Any]:
    """OpenAI's completion logprobs: tokens, their logprobs, top alternatives, offsets."""
    text_offset = []
    position = offset
    for token in tokens:
        text_offset.append(position)
        position += len(token.text)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": [finite(token.logprob) for token in tokens],
        "top_logprobs": [{t.text: finite(t.logprob) for t in top} for top in tops]
        if tops
        else None,
        "text_offset": text_offset,
    }


def completion(
    identity: Identity, events: list[FinalEvent], prompts: list[str], *, logprobs: bool
) -> dict[str, Any]:
    """The `text_completion` body of finished requests, one choice per prompt."""
    choices = []
    for index, event in enumerate(events):
        offset = len(event.generated_text) - len("".join(t.text for t in event.tokens))
        choices.append(
            {
                "index": index,
                "text": event.generated_text,
                "logprobs": _logprobs(event.tokens, event.top_tokens, max(offset, 0))
                if logprobs
                else None,
                "finish_reason": finish_reason(event.finish_reason),
            }
        )
    usage = Usage.of(
        sum(event.input_length for event in events),
        sum(event.generated_tokens for event in events),
    )
    return {**identity.fields("text_completion"), "choices": choices, "usage": usage.model_dump()}


async def completion_stream(
    handles: list[RequestHandle],
    identity: Identity,
    prompts: list[str],
    *,
    echo: bool,
    logprobs: bool,
    include_usage: bool,
    keep_alive_s: float,
    openai_shape: bool = True,
) -> AsyncIterator[str]:
    """Chunks from every prompt as tokens come, an optional usage chunk, then
    `data: [DONE]`. `finish_reason` is null until a prompt's last chunk, as OpenAI and
    vLLM send it (TGI sends "", which clients testing `is not None` read as the end)."""

    def chunk(
        index: int,
        text: str,
        reason: str | None,
        token: GeneratedToken | None = None,
        top: tuple[GeneratedToken, ...] = (),
    ) -> str:
        choice_logprobs = None
        if logprobs and token is not None:
            choice_logprobs = _logprobs((token,), (top,) if top else (), 0)
        choice = {
            "index": index,
            "text": text,
            "logprobs": choice_logprobs,
            "finish_reason": reason,
        }
        return sse({**identity.fields("text_completion"), "choices": [choice]})

    if echo:
        for index, prompt in enumerate(prompts):
            yield chunk(index, prompt, None)
    finals: list[FinalEvent] = []
    async for item in merged_events(handles, keep_alive_s):
        if item is None:
            yield KEEP_ALIVE
            continue
        index, event = item
        if isinstance(event, ErrorEvent):
            yield failure_event(event.message, event.error_type, openai_shape=openai_shape)
            return
        text = "" if event.token.special else event.token.text
        if isinstance(event, TokenEvent):
            yield chunk(index, text, None, event.token, event.top_tokens)
            continue
        finals.append(event)
        yield chunk(
            index, text, finish_reason(event.finish_reason), event.token, event.last_top_tokens
        )
    if len(finals) != len(handles):
        return  # the client left
    if include_usage:
        usage = Usage.of(
            sum(event.input_length for event in finals),
            sum(event.generated_tokens for event in finals),
        )
        yield sse(
            {**identity.fields("text_completion"), "choices": [], "usage": usage.model_dump()}
        )
    yield DONE
