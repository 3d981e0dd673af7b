"""The official `openai` SDK against a real tgi server on SmolLM2.

Chat greedy output must be transformers' `generate()` on the chat template's tokens,
token for token; every body is checked against TGI's OpenAPI document.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from tgi.testing.openapi import OpenApiSchemas

from .conftest import Reference, RunningServer

openai = pytest.importorskip("openai", reason="the `openai` SDK is in the test extra")

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def schemas(openapi: dict[str, Any]) -> OpenApiSchemas:
    return OpenApiSchemas(openapi)


@pytest.fixture(scope="module")
def client(smollm2_server: RunningServer) -> Iterator[Any]:
    with openai.OpenAI(
        base_url=f"{smollm2_server.url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as sdk:
        yield sdk


def reference_chat(
    reference: Reference, messages: list[dict[str, Any]], n: int
) -> tuple[int, list[int]]:
    """transformers' greedy continuation of `apply_chat_template(messages)`:
    (prompt length, generated ids)."""
    encoded = reference.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    input_ids = encoded["input_ids"]
    return input_ids.shape[1], reference.greedy_ids(input_ids, n)


def test_chat_greedy_equals_transformers(
    client: Any, reference: Reference, schemas: OpenApiSchemas
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tgi",
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    schemas.validate("ChatCompletion", json.loads(raw.text))
    completion = raw.parse()
    prompt_length, expected = reference_chat(reference, QUESTION, 16)
    tokenizer = reference.tokenizer
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    # token for token: one logprob entry per generated token, each that token's text
    texts = [entry.token for entry in choice.logprobs.content]
    assert texts == [tokenizer.decode([i]) for i in expected]
    for entry in choice.logprobs.content:  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    assert completion.usage.prompt_tokens == prompt_length
    assert completion.usage.completion_tokens == len(expected)
    eos = tokenizer.eos_token_id
    assert choice.finish_reason == ("stop" if expected[-1] == eos else "length")


def test_chat_stream_matches_the_answer(client: Any, schemas: OpenApiSchemas) -> None:
    kwargs: dict[str, Any] = {
        "model": "tgi",
        "messages": QUESTION,
        "max_tokens": 12,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    for chunk in chunks:
        schemas.validate("ChatCompletionChunk", chunk.model_dump(exclude_unset=True))
    *tokens, usage = chunks
    text = "".join(chunk.choices[0].delta.content or "" for chunk in tokens)
    assert text == whole.choices[0].message.content
    assert tokens[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == whole.usage


def test_seed_reproduces_a_sampled_chat(client: Any) -> None:
    kwargs: dict[str, Any] = {
        "model": "tgi",
        "messages": QUESTION,
        "max_tokens": 10,
        "temperature": 0.9,
        "seed": 1234,
    }
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_stop_sequence(client: Any) -> None:
    kwargs: dict[str, Any] = {"model": "tgi", "messages": QUESTION, "temperature": 0}
    whole = client.chat.completions.create(**kwargs, max_tokens=12).choices[0].message.content
    word = whole.split()[2]
    stopped = client.chat.completions.create(**kwargs, max_tokens=12, stop=[word]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content.endswith(word)
    assert len(stopped.message.content) < len(whole)


def test_completions(client: Any, reference: Reference, schemas: OpenApiSchemas) -> None:
    prompt = "The capital of France is"
    raw = client.completions.with_raw_response.create(
        model="tgi", prompt=[prompt, "One, two,"], max_tokens=6, temperature=0, logprobs=1
    )
    body = json.loads(raw.text)
    # `logprobs` is OpenAI's object here; TGI's schema keeps an array it never fills.
    for choice in body["choices"]:
        assert set(choice.pop("logprobs")) == {
            "tokens",
            "token_logprobs",
            "top_logprobs",
            "text_offset",
        }
    schemas.validate("CompletionFinal", body)
    completion = raw.parse()
    expected = reference.greedy(prompt, 6)
    first = completion.choices[0]
    assert first.text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert len(first.logprobs.token_logprobs) == len(expected)
    assert [choice.index for choice in completion.choices] == [0, 1]
    streamed = client.completions.create(
        model="tgi", prompt=prompt, max_tokens=6, temperature=0, stream=True, echo=True
    )
    text = "".join(chunk.choices[0].text for chunk in streamed)
    assert text == prompt + first.text


def test_models(client: Any, smollm2_server: RunningServer) -> None:
    model_id = smollm2_server.state.model.model_id
    assert [model.id for model in client.models.list()] == [model_id]
    assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-this-one")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"n": 2},
        {"max_tokens": 100_000},
        {"messages": []},
    ],
)
def test_bad_input_raises_typed_exceptions(client: Any, kwargs: dict[str, Any]) -> None:
    request = {"model": "tgi", "messages": QUESTION, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == 422
    assert caught.value.body["message"]  # the SDK reads OpenAI's error object


def test_json_schema_response_format(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris?"}]


def test_a_tool_call(client: Any, schemas: OpenApiSchemas) -> None:
    kwargs: dict[str, Any] = {
        "model": "tgi",
        "messages": WEATHER_QUESTION,
        "max_tokens": 40,
        "temperature": 0,
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
    }
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    schemas.validate("ChatCompletion", json.loads(raw.text))
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    # Streamed: the deltas concatenate to the same call.
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather"
    streamed = "".join(delta.function.arguments or "" for delta in deltas)
    assert json.loads(streamed) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
