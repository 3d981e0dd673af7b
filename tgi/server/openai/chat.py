"""/v1/chat/completions: a chat becomes a templated prompt plus TGI parameters, and
router events become `chat.completion` bodies or `chat.completion.chunk` events.

The parameter mapping is TGI's `ChatRequest::try_into_generate` (router/src/lib.rs):
`temperature: 0` means greedy, any other value (or none) samples; `presence_penalty`
becomes `repetition_penalty = presence_penalty + 2.0`; `frequency_penalty` is TGI's
frequency penalty; `top_logprobs` is `top_n_tokens`; `max_tokens` (or OpenAI's newer
`max_completion_tokens`) is `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tgi.errors import InvalidRequest, TgiError
from tgi.router.request import ErrorEvent, FinalEvent, GeneratedToken, TokenEvent
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters
from tgi.server.openai.chat_template import render_chat
from tgi.server.openai.common import (
    DONE,
    Identity,
    error_event,
    failure_event,
    finish_reason,
    finite,
    merged_events,
    sse,
)
from tgi.server.openai.schemas import ChatRequest, Usage
from tgi.server.openai.tools import (
    DEFAULT_TOOL_PROMPT,
    ToolCallStream,
    ToolError,
    ToolGrammar,
    new_call_id,
    parse_tool_call,
    response_format_grammar,
    tool_grammar,
)
from tgi.server.serving import KEEP_ALIVE

__all__ = ["ChunkWriter", "PreparedChat", "chat_completion", "chat_stream", "prepare_chat"]


@dataclass(frozen=True, slots=True)
class PreparedChat:
    """A chat request ready for the validator."""

    inputs: str  # the templated prompt
    params: ClientParameters
    tools: ToolGrammar | None  # set when the output is a tool call to parse


def _common_checks(body: ChatRequest) -> None:
    if body.n is not None and body.n != 1:
        raise InvalidRequest("`n` must be 1: this server returns one choice per request")
    if body.logit_bias:
        raise InvalidRequest("`logit_bias` is not supported")
    if body.tools and body.response_format is not None:
        raise ToolError("Grammar and tools are mutually exclusive")


def prepare_chat(body: ChatRequest, tokenizer: Any) -> PreparedChat:
    """Template the messages (with the tools, if any) and map the parameters."""
    _common_checks(body)
    tools = tool_grammar(body.tools, body.tool_choice)
    grammar: dict[str, Any] | None = None
    if tools is not None:
        prompt = body.tool_prompt or DEFAULT_TOOL_PROMPT
        inputs = render_chat(
            tokenizer,
            body.messages,
            tools=tools.tools,
            tool_prompt=prompt,
            guideline=body.guideline,
        )
        grammar = tools.grammar
    else:
        inputs = render_chat(tokenizer, body.messages, guideline=body.guideline)
        if body.response_format is not None:
            grammar = response_format_grammar(body.response_format)
    greedy = body.temperature == 0.0
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    params = ClientParameters(
        do_sample=not greedy,
        max_new_tokens=max_tokens,
        temperature=None if greedy else body.temperature,
        # 1.0 is "no nucleus filter" for OpenAI; TGI's validator wants < 1.0 for a filter
        top_p=None if body.top_p == 1.0 else body.top_p,
        repetition_penalty=None if body.presence_penalty is None else body.presence_penalty + 2.0,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(body.stop),
        top_n_tokens=(body.top_logprobs or 0) if body.logprobs else None,
        grammar=grammar,
        ignore_eos=body.ignore_eos,
    )
    return PreparedChat(inputs=inputs, params=params, tools=tools)


# ---- responses ---------------------------------------------------------------------


def _logprob(token: GeneratedToken, top: tuple[GeneratedToken, ...]) -> dict[str, Any]:
    return {
        "token": token.text,
        "logprob": finite(token.logprob),
        "top_logprobs": [{"token": t.text, "logprob": finite(t.logprob)} for t in top],
    }


def _logprobs(event: FinalEvent) -> dict[str, Any]:
    tops = event.top_tokens or tuple(() for _ in event.tokens)
    return {"content": [_logprob(t, top) for t, top in zip(event.tokens, tops, strict=True)]}


def chat_completion(
    identity: Identity, event: FinalEvent, *, tools: ToolGrammar | None, logprobs: bool
) -> dict[str, Any]:
    """The `chat.completion` body of a finished request."""
    message: dict[str, Any] = {"role": "assistant", "content": event.generated_text}
    reason = finish_reason(event.finish_reason)
    if tools is not None:
        call = parse_tool_call(event.generated_text)
        if isinstance(call, str):
            message["content"] = call
        else:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            }
            reason = "tool_calls"
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _logprobs(event) if logprobs else None,
        "finish_reason": reason,
    }
    usage = Usage.of(event.input_length, event.generated_tokens)
    return {
        **identity.fields("chat.completion"),
        "choices": [choice],
        "usage": usage.model_dump(),
    }


class ChunkWriter:
    """Builds one stream's `chat.completion.chunk` events."""

    def __init__(self, identity: Identity, *, logprobs: bool, include_usage: bool) -> None:
        self.identity = identity
        self.logprobs = logprobs
        self.include_usage = include_usage

    def chunk(
        self,
        delta: dict[str, Any],
        *,
        token: GeneratedToken | None = None,
        top: tuple[GeneratedToken, ...] = (),
        reason: str | None = None,
    ) -> str:
        logprobs = None
        if self.logprobs and token is not None:
            logprobs = {"content": [_logprob(token, top)]}
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return sse(
            {**self.identity.fields("chat.completion.chunk"), "choices": [choice], "usage": None}
        )

    def usage(self, event: FinalEvent) -> str:
        usage = Usage.of(event.input_length, event.generated_tokens)
        return sse(
            {
                **self.identity.fields("chat.completion.chunk"),
                "choices": [],
                "usage": usage.model_dump(),
            }
        )


def _text(token: GeneratedToken) -> str:
    """A streamed token's text; special tokens (EOS) add none, as in `generated_text`."""
    return "" if token.special else token.text


def _tool_delta(call_id: str, name: str | None, arguments: str) -> dict[str, Any]:
    function = {"name": name, "arguments": arguments}
    return {
        "role": "assistant",
        "tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": function}],
    }


async def chat_stream(
    handle: RequestHandle,
    writer: ChunkWriter,
    *,
    tools: ToolGrammar | None,
    keep_alive_s: float,
    openai_shape: bool = True,
) -> AsyncIterator[str]:
    """The SSE body: one chunk per token (tool calls as `tool_calls` deltas), the usage
    chunk when asked, then `data: [DONE]`; a failure is one error event, then the end."""
    call = ToolCallStream() if tools is not None else None
    call_id = new_call_id()
    async for item in merged_events([handle], keep_alive_s):
        if item is None:
            yield KEEP_ALIVE
            continue
        _, event = item
        if isinstance(event, ErrorEvent):
            yield failure_event(event.message, event.error_type, openai_shape=openai_shape)
            return
        top = event.last_top_tokens if isinstance(event, FinalEvent) else event.top_tokens
        if call is None:
            reason = finish_reason(event.finish_reason) if isinstance(event, FinalEvent) else None
            delta = {"role": "assistant", "content": _text(event.token)}
            yield writer.chunk(delta, token=event.token, top=top, reason=reason)
        else:
            try:
                for chunk in _tool_chunks(call, call_id, writer, event, top):
                    yield chunk
            except TgiError as exc:
                yield error_event(exc, openai_shape=openai_shape)
                return
        if isinstance(event, FinalEvent):
            if writer.include_usage:
                yield writer.usage(event)
            yield DONE
            return


def _tool_chunks(
    call: ToolCallStream,
    call_id: str,
    writer: ChunkWriter,
    event: TokenEvent | FinalEvent,
    top: tuple[GeneratedToken, ...],
) -> list[str]:
    """The chunks one token of a tool grammar's output gives (maybe none)."""
    chunks = []
    name, arguments = call.push(_text(event.token))
    if call.is_no_tool:  # a plain answer: its text streams as content
        if arguments:
            delta = {"role": "assistant", "content": arguments}
            chunks.append(writer.chunk(delta, token=event.token, top=top))
    elif name is not None:
        chunks.append(writer.chunk(_tool_delta(call_id, name, ""), token=event.token, top=top))
        if arguments:
            chunks.append(writer.chunk(_tool_delta(call_id, None, arguments)))
    elif arguments:
        chunks.append(
            writer.chunk(_tool_delta(call_id, None, arguments), token=event.token, top=top)
        )
    if isinstance(event, FinalEvent):
        content, late_name, rest = call.finish()
        if content is not None:  # a no_tool answer: the rest of its content
            reason = finish_reason(event.finish_reason)
            delta = {"role": "assistant", "content": content}
            chunks.append(writer.chunk(delta, reason=reason))
        else:
            delta = _tool_delta(call_id, late_name, rest)
            chunks.append(writer.chunk(delta, reason="tool_calls"))
    return chunks
