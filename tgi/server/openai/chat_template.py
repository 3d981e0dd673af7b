"""Render a chat with the served model's own template, as transformers does.

The tokenizer's `apply_chat_template` is called itself (jinja2 in transformers'
sandbox, with `raise_exception`, `strftime_now`, `bos_token`/`eos_token`), so a chat's
prompt is exactly what `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`
gives, and greedy output matches transformers' `generate()` on it.

Tools reach the prompt as TGI puts them there (router/src/infer/chat_template.rs): a
template that reads `tools` gets them; either way the tool prompt is appended to the
last message after `\\n---\\n`, with the tools' JSON when the template cannot show them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tgi.server.openai.errors import TemplateError
from tgi.server.openai.schemas import ChatMessage, Tool

__all__ = ["render_chat", "template_reads_tools"]

logger = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def template_reads_tools(template: str) -> bool:
    """Whether the jinja template uses a `tools` variable (parsed, not grepped)."""
    import jinja2
    from jinja2 import meta

    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return "tools" in meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template does not parse: {exc}") from None


def _message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content a string, tool-call arguments a
    dict (transformers' convention), optional keys only when given."""
    out: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            arguments: Any = call.function.arguments
            if isinstance(arguments, str):
                # a template may still print a string that is no JSON as it is
                with contextlib.suppress(json.JSONDecodeError):
                    arguments = json.loads(arguments)
            calls.append(
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            )
        out["tool_calls"] = calls
    return out


def _tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description is not None:
        function["description"] = tool.function.description
    function["parameters"] = tool.function.parameters
    return {"type": "function", "function": function}


def render_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    *,
    tools: Sequence[Tool] = (),
    tool_prompt: str = "",
    guideline: str | None = None,
) -> str:
    """The templated prompt, generation prompt added; raises `TemplateError` when the
    model has no template or rendering fails (a `raise_exception` in it included)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise TemplateError(
            "the model has no chat template: use /v1/completions or /generate instead"
        )
    if not messages:
        raise TemplateError("`messages` cannot be empty")
    rendered = [_message(message) for message in messages]
    tool_dicts = [_tool(tool) for tool in tools] or None
    kwargs: dict[str, Any] = {}
    if guideline is not None:
        kwargs["guideline"] = guideline  # TGI's template variable
    if tool_dicts is not None:
        if template_reads_tools(template):
            kwargs["tools"] = tool_dicts
            suffix = f"\n---\n{tool_prompt}"
        else:
            suffix = f"\n---\n{tool_prompt}\n{json.dumps(tool_dicts)}"
        rendered[-1]["content"] += suffix
    try:
        text = tokenizer.apply_chat_template(
            rendered, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except Exception as exc:  # jinja2 errors, raise_exception, a None in a concatenation
        logger.debug("chat template failed: %s", exc)
        raise TemplateError(str(exc) or type(exc).__name__) from None
    if not isinstance(text, str):
        raise TemplateError("the chat template did not render to text")
    return text
