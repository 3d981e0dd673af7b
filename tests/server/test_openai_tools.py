"""Tools, response formats and the chat template, without a model: the grammar TGI's
tool calls are constrained by, parsing the output back, and streaming it as deltas."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tgi.router.request import FinalEvent, FinishReason, GeneratedToken
from tgi.server.openai.chat import ChunkWriter, _tool_chunks, chat_completion
from tgi.server.openai.chat_template import render_chat, template_reads_tools
from tgi.server.openai.common import Identity
from tgi.server.openai.errors import TemplateError
from tgi.server.openai.schemas import ChatMessage, ResponseFormat, Tool, ToolChoiceFunction
from tgi.server.openai.tools import (
    NO_TOOL,
    ParsedToolCall,
    ToolCallStream,
    ToolError,
    parse_tool_call,
    response_format_grammar,
    tool_grammar,
)

WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    }
)
# TGI's own schema calls the parameters `arguments`; both spellings are read.
TIME = Tool.model_validate(
    {"type": "function", "function": {"name": "get_time", "arguments": {"type": "object"}}}
)


def valid(schema: dict[str, Any], instance: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


def test_auto_offers_every_tool_and_no_tool() -> None:
    grammar = tool_grammar([WEATHER, TIME], "auto")
    assert grammar is not None
    assert [tool.function.name for tool in grammar.tools] == ["get_weather", "get_time", NO_TOOL]
    assert grammar.grammar["type"] == "json"
    schema = grammar.grammar["value"]
    jsonschema.Draft202012Validator.check_schema(schema)
    assert valid(schema, {"function": {"_name": "get_weather", "city": "Paris"}})
    assert valid(schema, {"function": {"_name": "get_weather", "city": "Oslo", "unit": "c"}})
    assert valid(schema, {"function": {"_name": "get_time"}})
    assert valid(schema, {"function": {"_name": NO_TOOL, "content": "hi"}})
    assert not valid(schema, {"function": {"_name": "get_weather"}})  # city is required
    assert not valid(schema, {"function": {"_name": "get_weather", "city": "x", "unit": "k"}})
    assert not valid(schema, {"function": {"_name": "other", "city": "Paris"}})
    assert not valid(schema, {"function": {"_name": "get_time", "extra": 1}})
    assert not valid(schema, {"name": "get_time"})


def test_the_default_choice_is_auto() -> None:
    assert tool_grammar([WEATHER], None) == tool_grammar([WEATHER], "auto")


def test_required_offers_only_the_tools() -> None:
    grammar = tool_grammar([WEATHER, TIME], "required")
    assert grammar is not None
    schema = grammar.grammar["value"]
    assert not valid(schema, {"function": {"_name": NO_TOOL, "content": "hi"}})
    assert valid(schema, {"function": {"_name": "get_time"}})


def test_a_named_function_is_the_only_branch() -> None:
    choice = ToolChoiceFunction.model_validate({"function": {"name": "get_time"}})
    grammar = tool_grammar([WEATHER, TIME], choice)
    assert grammar is not None
    assert [tool.function.name for tool in grammar.tools] == ["get_time"]
    function = grammar.grammar["value"]["properties"]["function"]
    assert function["properties"]["_name"] == {"type": "string", "const": "get_time"}
    assert list(function["properties"]) == ["_name"]  # `_name` always comes first
    missing = ToolChoiceFunction.model_validate({"function": {"name": "nope"}})
    with pytest.raises(ToolError, match="Tool with name nope not found"):
        tool_grammar([WEATHER], missing)


def test_no_grammar_without_tools_or_with_none() -> None:
    assert tool_grammar(None, "auto") is None
    assert tool_grammar([], "required") is None
    assert tool_grammar([WEATHER], "none") is None
    with pytest.raises(ToolError, match="unique"):
        tool_grammar([WEATHER, WEATHER], "auto")


def test_parse_a_call_and_a_plain_answer() -> None:
    call = parse_tool_call('{"function": {"_name": "get_weather", "city": "Paris"}}')
    assert isinstance(call, ParsedToolCall)
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert parse_tool_call('{"function": {"_name": "no_tool", "content": "Hi!"}}') == "Hi!"
    for broken in ('{"function": {"_name": "get_we', '{"function": {}}', "[1]", '{"a": 1}'):
        with pytest.raises(ToolError, match="Failed to parse"):
            parse_tool_call(broken)


@pytest.mark.parametrize(
    "text",
    [
        '{"function": {"_name": "get_weather", "city": "Paris", "n": {"a": [1, "}"]}}}',
        '{"function":{"_name":"get_weather"}}',
        ' { "function" : { "_name" : "get_weather" ,  "city" : "a}" } }  ',
    ],
)
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_streamed_call_concatenates_to_its_arguments(text: str, step: int) -> None:
    stream = ToolCallStream()
    names, arguments = [], ""
    for start in range(0, len(text), step):
        name, delta = stream.push(text[start : start + step])
        if name is not None:
            names.append(name)
        arguments += delta
    content, late_name, rest = stream.finish()
    arguments += rest
    assert content is None and late_name is None
    assert names == ["get_weather"]
    expected = json.loads(text)["function"]
    del expected["_name"]
    assert json.loads(arguments) == expected


def test_a_streamed_no_tool_answer_streams_as_content() -> None:
    stream = ToolCallStream()
    text = '{"function": {"_name": "no_tool", "content": "Hello there"}}'
    outputs = [stream.push(char) for char in text]
    assert [name for name, _ in outputs if name is not None] == ["no_tool"]
    deltas = [delta for _, delta in outputs if delta]
    assert len(deltas) == len("Hello there")  # one character per pushed character
    assert "".join(deltas) == "Hello there"
    assert stream.finish() == ("", None, "")


ANSWERS = ["Hello there", 'Say "hi"\n\t\u00e9 \\ done \U0001f600 ok', "\ud83d lone", ""]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("ascii_only", [True, False])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_a_no_tool_answer_decodes_whole_escapes_only(
    answer: str, ascii_only: bool, step: int
) -> None:
    # escapes (\n, \", \uXXXX, surrogate pairs) may arrive split across tokens
    call = {"function": {"_name": "no_tool", "content": answer}}
    text = json.dumps(call, ensure_ascii=ascii_only)
    stream = ToolCallStream()
    streamed = "".join(
        stream.push(text[start : start + step])[1] for start in range(0, len(text), step)
    )
    rest, name, arguments = stream.finish()
    assert (streamed, rest, name, arguments) == (answer, "", None, "")


def test_a_stream_that_never_names_a_function_fails() -> None:
    stream = ToolCallStream()
    stream.push('{"oops": 1}')
    with pytest.raises(ToolError):
        stream.finish()


def test_a_name_after_other_keys_comes_whole_at_the_end() -> None:
    # A compiler that sorts keys puts "City" before "_name".
    stream = ToolCallStream()
    assert stream.push('{"function": {"City": "Oslo", "_name": "get_weather"}}') == (None, "")
    content, name, arguments = stream.finish()
    assert (content, name, json.loads(arguments)) == (None, "get_weather", {"City": "Oslo"})


OBJECT, ARRAY = {"type": "object"}, {"type": "array"}


@pytest.mark.parametrize(
    ("response_format", "grammar"),
    [
        (
            {"type": "json", "value": {"type": "object"}},
            {"type": "json", "value": {"type": "object"}},
        ),
        (
            {"type": "json", "value": '{"type": "array"}'},
            {"type": "json", "value": {"type": "array"}},
        ),
        ({"type": "json_object"}, {"type": "json", "value": {"type": "object"}}),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}},
            {"type": "json", "value": {"type": "string"}},
        ),
        (
            {"type": "json_schema", "value": {"name": "x", "schema": {"type": "string"}}},
            {"type": "json", "value": {"type": "string"}},
        ),
        ({"type": "regex", "value": "a+"}, {"type": "regex", "value": "a+"}),
        ({"type": "text"}, None),
    ],
)
def test_response_formats(response_format: dict[str, Any], grammar: Any) -> None:
    assert response_format_grammar(ResponseFormat.model_validate(response_format)) == grammar


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json"}, {"type": "json_schema"}, {"type": "regex", "value": 3}],
)
def test_incomplete_response_formats(response_format: dict[str, Any]) -> None:
    from tgi.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        response_format_grammar(ResponseFormat.model_validate(response_format))


# ---- the chat template ---------------------------------------------------------------


class TemplateTokenizer:
    """A stand-in with transformers' rendering: the real `apply_chat_template` is what
    the byte tokenizer tests cover; this one checks what render_chat hands over."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls.append({"messages": messages, **kwargs})
        return "rendered"


def test_tools_are_appended_to_the_last_message_for_a_template_without_tools() -> None:
    tokenizer = TemplateTokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")
    messages = [ChatMessage(role="user", content="hi")]
    assert render_chat(tokenizer, messages, tools=[WEATHER], tool_prompt="PROMPT") == "rendered"
    (call,) = tokenizer.calls
    assert "tools" not in call
    content = call["messages"][-1]["content"]
    prefix = "hi\n---\nPROMPT\n"
    assert content.startswith(prefix)
    assert json.loads(content.removeprefix(prefix))[0]["function"]["name"] == "get_weather"
    assert call["add_generation_prompt"] is True and call["tokenize"] is False


def test_a_template_that_reads_tools_gets_them() -> None:
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}"
    assert template_reads_tools(template)
    tokenizer = TemplateTokenizer(template)
    render_chat(
        tokenizer, [ChatMessage(role="user", content="hi")], tools=[WEATHER], tool_prompt="P"
    )
    (call,) = tokenizer.calls
    assert call["tools"][0]["function"]["parameters"]["required"] == ["city"]
    assert call["messages"][-1]["content"] == "hi\n---\nP"


def test_tool_call_messages_reach_the_template_with_dict_arguments() -> None:
    tokenizer = TemplateTokenizer("{{ messages }}")
    message = ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        }
    )
    render_chat(tokenizer, [message])
    (rendered,) = tokenizer.calls[0]["messages"]
    assert rendered["content"] == ""
    assert rendered["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_a_template_that_does_not_parse_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="does not parse"):
        render_chat(
            TemplateTokenizer("{% for %}"),
            [ChatMessage(role="user", content="hi")],
            tools=[WEATHER],
        )


# ---- tool calls in responses ---------------------------------------------------------


def _token(text: str, special: bool = False) -> GeneratedToken:
    return GeneratedToken(id=1, text=text, logprob=-0.5, special=special)


def _final(text: str, tokens: list[GeneratedToken]) -> FinalEvent:
    return FinalEvent(
        index=len(tokens),
        token=tokens[-1],
        generated_text=text,
        finish_reason=FinishReason.EOS_TOKEN,
        generated_tokens=len(tokens),
        input_length=10,
        seed=None,
        tokens=tuple(tokens),
        prefill=(),
        queued_s=0.0,
        inference_s=0.0,
    )


class _State:
    """What `Identity` reads from a server state."""

    class model:
        model_id = "m"

    class config:
        environ: dict[str, str] = {}


def test_a_tool_call_completion(schemas: Any) -> None:
    text = '{"function": {"_name": "get_weather", "city": "Paris"}}'
    grammar = tool_grammar([WEATHER], "required")
    body = chat_completion(
        Identity("chatcmpl", _State(), None),  # type: ignore[arg-type]
        _final(text, [_token(text), _token("<|im_end|>", special=True)]),
        tools=grammar,
        logprobs=False,
    )
    schemas.validate("ChatCompletion", body)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] is None


def test_a_no_tool_completion_is_content(schemas: Any) -> None:
    text = '{"function": {"_name": "no_tool", "content": "Hi"}}'
    body = chat_completion(
        Identity("chatcmpl", _State(), None),  # type: ignore[arg-type]
        _final(text, [_token(text)]),
        tools=tool_grammar([WEATHER], "auto"),
        logprobs=False,
    )
    schemas.validate("ChatCompletion", body)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    assert body["choices"][0]["finish_reason"] == "stop"


def _streamed_chunks(pieces: list[str], schemas: Any) -> list[dict[str, Any]]:
    """The chunks a tool grammar's output gives when each piece is one token (the last
    one final), each validated against TGI's `ChatCompletionChunk` schema."""
    from tgi.router.request import TokenEvent

    writer = ChunkWriter(Identity("chatcmpl", _State(), None), logprobs=False, include_usage=False)  # type: ignore[arg-type]
    stream = ToolCallStream()
    chunks: list[dict[str, Any]] = []
    tokens = [_token(piece) for piece in pieces]
    for index, token in enumerate(tokens):
        event: Any = TokenEvent(index=index + 1, token=token)
        if index == len(tokens) - 1:
            event = _final("".join(pieces), tokens)
        for sse in _tool_chunks(stream, "call_x", writer, event, ()):
            chunks.append(json.loads(sse.removeprefix("data: ")))
    for chunk in chunks:
        schemas.validate("ChatCompletionChunk", chunk)
    return chunks


def test_streamed_no_tool_chunks_are_content(schemas: Any) -> None:
    pieces = ['{"function": {"_name": "no', '_tool", "content": "Hel', 'lo \\"you', '\\""}', "}"]
    chunks = _streamed_chunks(pieces, schemas)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert all("tool_calls" not in delta for delta in deltas)
    assert [delta["content"] for delta in deltas[:-1]] == ["Hel", 'lo "you', '"']
    assert "".join(delta["content"] for delta in deltas) == 'Hello "you"'
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}


def test_streamed_tool_call_chunks(schemas: Any) -> None:
    pieces = ['{"function": {"_na', 'me": "get_weather", "ci', 'ty": "Paris"}', "}"]
    chunks = _streamed_chunks(pieces, schemas)
    calls = [chunk["choices"][0]["delta"]["tool_calls"][0] for chunk in chunks]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all(call["id"] == "call_x" and call["index"] == 0 for call in calls)
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
