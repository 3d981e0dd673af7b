"""Tools and response formats as TGI grammars, and the model's tool-call output parsed back.

TGI (router/src/infer/tool_grammar.rs) constrains a tool call with one JSON schema whose
instances look like `{"function": {"_name": "get_weather", "location": "Paris"}}`: each
tool is an object with a constant `_name` and the tool's own parameters; `auto` adds a
`no_tool` function whose `content` is a plain answer. The schema here is TGI's, written
with the anyOf branches inline instead of TGI's non-standard `$functions` references, so
any JSON-schema grammar compiler reads it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tgi.errors import InvalidRequest
from tgi.server.openai.schemas import ResponseFormat, Tool, ToolChoice, ToolChoiceFunction

__all__ = [
    "DEFAULT_TOOL_PROMPT",
    "NO_TOOL",
    "ParsedToolCall",
    "ToolCallStream",
    "ToolError",
    "ToolGrammar",
    "parse_tool_call",
    "response_format_grammar",
    "tool_grammar",
]

# The spec's `tool_prompt` example, TGI's default_tool_prompt() without its newlines.
DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with "
    "its proper arguments that best answers the given prompt. Respond in the format "
    "{name: function name, parameters: dictionary of argument name and its value}."
    "Do not use variables."
)

NO_TOOL = "no_tool"
_NO_TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"content": {"type": "string", "description": "The response content"}},
    "required": ["content"],
}


class ToolError(InvalidRequest):
    """A tool request TGI refuses (422, `error_type: tool_error`)."""

    error_type = "tool_error"


@dataclass(frozen=True, slots=True)
class ToolGrammar:
    """What a tool request turns into: the tools the prompt shows, and the grammar."""

    tools: tuple[Tool, ...]  # the tools offered, `no_tool` included for `auto`
    grammar: dict[str, Any]  # TGI's `{"type": "json", "value": schema}`


def _no_tool() -> Tool:
    return Tool.model_validate(
        {
            "type": "function",
            "function": {
                "name": NO_TOOL,
                "description": "Open ended response with no specific tool selected",
                "parameters": _NO_TOOL_PARAMETERS,
            },
        }
    )


def _function_schema(tool: Tool) -> dict[str, Any]:
    """One branch: `_name` first (so a stream learns the name first), then the tool's
    own properties and required names; no other keys, as TGI's schema has it. Raises
    `ToolError` for properties that are no object or required names that are no list
    of strings (TGI drops them silently; the grammar would not be the tool's)."""
    name, parameters = tool.function.name, tool.function.parameters
    own_properties = parameters.get("properties") or {}
    if not isinstance(own_properties, dict):
        raise ToolError(f"tool `{name}`: `parameters.properties` must be an object")
    own_required = parameters.get("required") or []
    if not isinstance(own_required, list) or not all(isinstance(r, str) for r in own_required):
        raise ToolError(f"tool `{name}`: `parameters.required` must be an array of names")
    properties: dict[str, Any] = {"_name": {"type": "string", "const": name}, **own_properties}
    required = ["_name", *own_required]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": parameters.get("additionalProperties") is True,
    }
    if tool.function.description:
        schema["description"] = tool.function.description
    return schema


def tool_grammar(tools: list[Tool] | None, choice: ToolChoice | None) -> ToolGrammar | None:
    """TGI's `ToolGrammar::apply`: None when no tool may be called (no tools, or
    `tool_choice: "none"`); raises `ToolError` when the chosen function is unknown."""
    if not tools or choice == "none":
        return None
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise ToolError("tool names must be unique")
    if isinstance(choice, ToolChoiceFunction):
        wanted = choice.function.name
        chosen = [tool for tool in tools if tool.function.name == wanted]
        if not chosen:
            raise ToolError(f"Tool with name {wanted} not found")
        offered = tuple(chosen)
    elif choice == "required":
        offered = tuple(tools)
    else:  # "auto", the default
        offered = (*tools, _no_tool())
    branches = [_function_schema(tool) for tool in offered]
    function = branches[0] if len(branches) == 1 else {"anyOf": branches}
    schema = {
        "type": "object",
        "properties": {"function": function},
        "required": ["function"],
        "additionalProperties": False,
    }
    return ToolGrammar(tools=offered, grammar={"type": "json", "value": schema})


def response_format_grammar(response_format: ResponseFormat) -> dict[str, Any] | None:
    """TGI's grammar for a `response_format`; None for OpenAI's `text` (no constraint)."""
    kind = response_format.type
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    if kind == "regex":
        if not isinstance(response_format.value, str):
            raise InvalidRequest("a `regex` response_format needs a string `value`")
        return {"type": "regex", "value": response_format.value}
    if kind == "json_schema":
        # OpenAI: {"json_schema": {"name", "schema", "strict"}}; TGI: {"value": {"schema"}}
        config = response_format.json_schema
        if config is None and isinstance(response_format.value, dict):
            schema = response_format.value.get("schema")
        else:
            schema = None if config is None else config.schema_
        if schema is None:
            raise InvalidRequest("a `json_schema` response_format needs a `schema`")
        return {"type": "json", "value": schema}
    if response_format.value is None:
        raise InvalidRequest("a `json` response_format needs a `value` schema")
    value = response_format.value
    if isinstance(value, str):  # TGI accepts the schema as a JSON string too
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"the `json` response_format value is not JSON: {exc}") from None
    return {"type": "json", "value": value}


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """A call the model made (`name` is never `no_tool`)."""

    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI's `function.arguments`


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call(text: str) -> ParsedToolCall | str:
    """The call in a tool grammar's output, or the plain answer of a `no_tool` call.

    Raises `ToolError` when the text is no such call (TGI answers 422 then too), for
    example when `max_tokens` cut the JSON short.
    """
    try:
        document = json.loads(text)
        function = dict(document["function"])
        name = function.pop("_name")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ToolError(f"Failed to parse generated text as a tool call: {exc}") from None
    if not isinstance(name, str):
        raise ToolError("Failed to parse generated text as a tool call: `_name` is no string")
    if name == NO_TOOL:
        return str(function.get("content", ""))
    return ParsedToolCall(id=new_call_id(), name=name, arguments=json.dumps(function))


_NAME = re.compile(r'^\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_COMMA = re.compile(r"\s*(?:,\s*)?")
_TRAILING_CLOSE = re.compile(r"\}\s*$")
_CONTENT_KEY = re.compile(r'\s*,\s*"content"\s*:\s*"')  # no_tool's answer, after its name
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")
_LOW_SURROGATE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


class ToolCallStream:
    """Turns a tool grammar's output, token by token, into OpenAI's streamed deltas.

    NOTE: the text is `{"function": {"_name": "<name>"<, args...>}}`. Once the name is
    read, `push` returns it once; the arguments then stream as `{` + the body, the text
    after the comma that follows the name. A final `}` (plus whitespace) of the body is
    always held back, since it may be the outer object's; `finish` drops the last `}`.
    So the deltas concatenate to the arguments object:

        {"function": {"_name": "f", "a": 1}}
                                   |------|  body up to the held-back last "}"
        arguments = "{" + "\"a\": 1}"

    A `no_tool` answer streams as content: the JSON string after `"content": "` is decoded
    as it arrives (an escape is held back until it is whole, a surrogate pair until both
    halves are there), and `finish` gives what is left of it.
    """

    def __init__(self) -> None:
        self._text = ""
        self._name: str | None = None
        self._args_at = 0  # where the text after the name starts, once the name is read
        self._body_at: int | None = None  # where the arguments' body starts, once known
        self._sent = 0  # characters of the body already given out
        self._opened = False  # whether the leading "{" was given out
        self._content_at: int | None = None  # no_tool: where the answer's next char is
        self._content = ""  # no_tool: the answer given out so far

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def is_no_tool(self) -> bool:
        return self._name == NO_TOOL

    def push(self, text: str) -> tuple[str | None, str]:
        """Add generated text; returns (the name when first read, new argument text, or
        for `no_tool` new answer text)."""
        self._text += text
        announced = None
        if self._name is None:
            match = _NAME.match(self._text)
            if match is None:
                return None, ""
            self._name = json.loads(f'"{match.group(1)}"')
            self._args_at = match.end()
            announced = self._name
        if self.is_no_tool:
            return announced, self._answer()
        return announced, self._arguments(final=False)

    def _answer(self) -> str:
        """The no_tool answer's characters decoded since the last call."""
        text = self._text
        if self._content_at is None:
            key = _CONTENT_KEY.match(text, self._args_at)
            if key is None:
                return ""
            self._content_at = key.end()
        pieces, at = [], self._content_at
        while at < len(text) and text[at] != '"':  # an unescaped quote ends the string
            if text[at] != "\\":
                end = at
                while end < len(text) and text[end] not in '"\\':
                    end += 1
                pieces.append(text[at:end])
                at = end
                continue
            width = 6 if text.startswith("\\u", at) else 2
            if _HIGH_SURROGATE.match(text, at):
                if at + 12 > len(text):
                    break  # its low half may be on its way: decode the pair together
                width = 12 if _LOW_SURROGATE.match(text, at + 6) else 6
            if at + width > len(text):
                break  # an escape not whole yet
            pieces.append(json.loads(f'"{text[at : at + width]}"'))
            at += width
        self._content_at = at
        delta = "".join(pieces)
        self._content += delta
        return delta

    def _body_start(self) -> int | None:
        if self._body_at is None:
            rest = self._text[self._args_at :]
            end = _COMMA.match(rest).end()  # type: ignore[union-attr]  # always matches
            if end == len(rest):
                return None  # only whitespace and the comma so far
            self._body_at = self._args_at + end
        return self._body_at

    def _arguments(self, *, final: bool) -> str:
        start = self._body_start()
        if start is None:
            if not final:
                return ""
            start = len(self._text)
        body = self._text[start:]
        if final:
            cut = body.rstrip()
            stop = len(cut) - 1 if cut.endswith("}") else len(cut)
        else:
            close = _TRAILING_CLOSE.search(body)
            stop = close.start() if close is not None else len(body)
        delta = "" if self._opened else "{"
        self._opened = True
        if stop > self._sent:
            delta += body[self._sent : stop]
            self._sent = stop
        return delta

    def finish(self) -> tuple[str | None, str | None, str]:
        """At the end: (a `no_tool` answer's content not given out by `push` yet, or None,
        the function's name when `push` never announced it, the last argument text).

        A name read only now happens when `_name` is not the first key (a grammar
        compiler that sorts keys puts upper-case names first): the whole call is parsed
        then and its arguments come in one piece.
        """
        if self._name is None:
            call = parse_tool_call(self._text)
            if isinstance(call, str):
                return call, None, ""
            self._name = call.name
            return None, call.name, call.arguments
        if self.is_no_tool:
            result = parse_tool_call(self._text)
            answer = result if isinstance(result, str) else ""
            return answer.removeprefix(self._content), None, ""
        return None, None, self._arguments(final=True)
