"""The OpenAI-compatible routes against the fake backend: shapes (checked against TGI's
OpenAPI document), defaults, parameter mapping, validation, errors, streaming."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tgi.router.validation import ClientParameters
from tgi.testing.fake_backend import FakeBackend, expected_tokens

# The fake model puts logit 10 on its preferred token and 0 on the other 258 (vocab 259).
TOP_LOGPROB = -math.log1p(258 * math.exp(-10.0))
HELLO = [{"role": "user", "content": "hello"}]


def templated(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return text


def greedy_text(tokenizer: Any, prompt: str, num_tokens: int) -> str:
    ids = expected_tokens(tokenizer.encode(prompt), num_tokens, len(tokenizer))
    assert tokenizer.eos_token_id not in ids, "pick a prompt that does not reach EOS"
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def sse_events(body: str) -> list[Any]:
    """Every `data:` payload, JSON-decoded except the final `[DONE]`."""
    events: list[Any] = []
    for block in body.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response: Any, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type
    return str(body["error"]["message"])


class ParamsSpy:
    """Records what the OpenAI routes hand to the router's validator."""

    def __init__(self, state: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, ClientParameters]] = []
        self.kwargs: dict[str, Any] = {}
        validate = state.validator.validate

        def spy(inputs: str, params: ClientParameters, **kwargs: Any) -> Any:
            self.calls.append((inputs, params))
            self.kwargs = kwargs
            return validate(inputs, params, **kwargs)

        monkeypatch.setattr(state.validator, "validate", spy)


# ---- /v1/chat/completions ------------------------------------------------------------


async def test_chat_greedy_completion(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    body = {"model": "my-model", "messages": HELLO, "max_tokens": 6, "temperature": 0}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    schemas.validate("ChatCompletion", completion)
    prompt = templated(byte_tokenizer, HELLO)
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "my-model"
    assert completion["system_fingerprint"].endswith("-native")
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": greedy_text(byte_tokenizer, prompt, 6)},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    prompt_tokens = len(byte_tokenizer.encode(prompt))
    assert completion["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }


async def test_chat_without_model_names_the_served_one(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    body = {"messages": HELLO, "max_tokens": 1}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.json()["model"] == "fake/model"


async def test_chat_parameter_mapping(
    make_state: Any, serve_state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = make_state()
    spy = ParamsSpy(state, monkeypatch)
    client = await serve_state(state)
    body = {
        "messages": HELLO,
        "max_completion_tokens": 3,
        "max_tokens": 9,  # the newer OpenAI field wins
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": "xy",
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logprobs": True,
        "top_logprobs": 2,
        "ignore_eos": True,
    }
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    (_, params) = spy.calls[-1]
    assert spy.kwargs == {"add_special_tokens": False}  # the template holds them (TGI)
    assert params == ClientParameters(
        do_sample=True,
        max_new_tokens=3,
        temperature=0.5,
        top_p=0.9,
        repetition_penalty=2.5,  # TGI: presence_penalty + 2.0
        frequency_penalty=0.25,
        seed=7,
        stop=("xy",),
        top_n_tokens=2,
        ignore_eos=True,
    )
    # Defaults: TGI's chat samples unless temperature is 0; top_p 1.0 is no filter.
    body = {"messages": HELLO, "max_tokens": 2, "top_p": 1.0}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    (_, params) = spy.calls[-1]
    assert params == ClientParameters(do_sample=True, max_new_tokens=2)
    body = {"messages": HELLO, "max_tokens": 2, "temperature": 0, "top_logprobs": 3}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    (_, params) = spy.calls[-1]
    assert params == ClientParameters(do_sample=False, max_new_tokens=2)


async def test_chat_seed_reproduces_a_sampled_answer(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 5.0, "seed": 3}
    first = (await client.post("/v1/chat/completions", json=body)).json()
    second = (await client.post("/v1/chat/completions", json=body)).json()
    other = (await client.post("/v1/chat/completions", json={**body, "seed": 4})).json()
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]
    assert text != other["choices"][0]["message"]["content"]


async def test_chat_logprobs(make_state: Any, serve_state: Any, schemas: Any) -> None:
    client = await serve_state(make_state())
    body = {
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    completion = (await client.post("/v1/chat/completions", json=body)).json()
    schemas.validate("ChatCompletion", completion)
    content = completion["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert math.isclose(entry["logprob"], TOP_LOGPROB, rel_tol=1e-4)
        assert len(entry["top_logprobs"]) == 2
        assert math.isclose(entry["top_logprobs"][0]["logprob"], TOP_LOGPROB, rel_tol=1e-4)
        assert entry["top_logprobs"][1]["logprob"] < entry["top_logprobs"][0]["logprob"]


async def test_chat_stream_matches_the_completion(
    make_state: Any, serve_state: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    body = {"messages": HELLO, "max_tokens": 6, "temperature": 0}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=stream_body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert len(chunks) == 6
    for chunk in chunks:
        schemas.validate("ChatCompletionChunk", chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == chunks[0]["id"]
        assert chunk["usage"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    schemas.validate("ChatCompletionChunk", usage)
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


async def test_chat_stream_without_usage_has_no_usage_chunk(
    make_state: Any, serve_state: Any
) -> None:
    client = await serve_state(make_state())
    body = {"messages": HELLO, "max_tokens": 2, "stream": True, "logprobs": True}
    events = sse_events((await client.post("/v1/chat/completions", json=body)).text)
    assert len(events) == 3 and events[-1] == "[DONE]"
    assert all(event["choices"] for event in events[:-1])
    assert all(len(e["choices"][0]["logprobs"]["content"]) == 1 for e in events[:-1])


async def test_chat_stop_sequence(make_state: Any, serve_state: Any, byte_tokenizer: Any) -> None:
    prompt = templated(byte_tokenizer, HELLO)
    full = greedy_text(byte_tokenizer, prompt, 8)
    stop = full[2:4]
    client = await serve_state(make_state())
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "stop": [stop]}
    choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].endswith(stop)  # TGI keeps the stop sequence
    assert len(choice["message"]["content"]) < len(full)


async def test_chat_content_parts_and_roles(
    make_state: Any, serve_state: Any, monkeypatch: pytest.MonkeyPatch, byte_tokenizer: Any
) -> None:
    state = make_state()
    spy = ParamsSpy(state, monkeypatch)
    client = await serve_state(state)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "tool", "content": "d", "tool_call_id": "call_1"},
    ]
    response = await client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}
    )
    assert response.status_code == 200, response.text
    flat = [{**m, "content": "ab"} if m["role"] == "user" else m for m in messages]
    assert spy.calls[-1][0] == templated(byte_tokenizer, flat)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"n": 2}, "Input validation error: `n` must be 1"),
        ({"logit_bias": {"1": 5}}, "Input validation error: `logit_bias` is not supported"),
        ({"temperature": -1}, "Input validation error: `temperature` must be strictly positive"),
        ({"max_tokens": 0}, "Input validation error: `max_new_tokens` must be strictly positive"),
        ({"top_p": 1.5}, "Input validation error: `top_p` must be > 0.0 and < 1.0"),
        ({"logprobs": True, "top_logprobs": 9}, "Input validation error: `top_n_tokens` must be"),
        ({"messages": []}, "Template error: `messages` cannot be empty"),
    ],
)
async def test_chat_validation_errors_are_openai_shaped(
    make_state: Any, serve_state: Any, body: dict[str, Any], message: str
) -> None:
    client = await serve_state(make_state())
    response = await client.post("/v1/chat/completions", json={"messages": HELLO, **body})
    error_type = "template_error" if message.startswith("Template") else "validation"
    assert assert_openai_error(response, 422, error_type).startswith(message)


async def test_chat_stream_validation_error_is_an_http_error(
    make_state: Any, serve_state: Any
) -> None:
    # The SDK raises its typed exception at once instead of reading an error event.
    client = await serve_state(make_state())
    body = {"messages": HELLO, "stream": True, "temperature": -1}
    response = await client.post("/v1/chat/completions", json=body)
    assert_openai_error(response, 422, "validation")


async def test_body_errors_are_openai_shaped(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert assert_openai_error(response, 400, "validation").startswith(
        "Failed to parse the request body as JSON"
    )
    response = await client.post("/v1/chat/completions", json={"messages": "hello"})
    assert_openai_error(response, 422, "validation")
    assert response.json()["error"]["param"] == "messages"
    response = await client.post("/v1/completions", json={"max_tokens": 2})
    assert_openai_error(response, 422, "validation")
    # TGI's own routes keep TGI's body.
    response = await client.post("/generate", json={"inputs": ""})
    assert set(response.json()) == {"error", "error_type"}


async def test_no_chat_template_is_a_template_error(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await serve_state(make_state())
    monkeypatch.setattr(byte_tokenizer, "chat_template", None)
    response = await client.post("/v1/chat/completions", json={"messages": HELLO})
    assert "no chat template" in assert_openai_error(response, 422, "template_error")


async def test_a_template_exception_is_a_template_error(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await serve_state(make_state())
    monkeypatch.setattr(
        byte_tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}"
    )
    response = await client.post("/v1/chat/completions", json={"messages": HELLO})
    message = assert_openai_error(response, 422, "template_error")
    assert message == "Template error: roles must alternate"


async def test_overloaded_is_429(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(max_concurrent_requests=1))
    body = {"prompt": ["a", "b"], "max_tokens": 1}
    response = await client.post("/v1/completions", json=body)
    assert assert_openai_error(response, 429, "overloaded") == "Model is overloaded"


async def test_generation_failure_is_424_and_a_stream_error_event(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    prompt_ids = tuple(byte_tokenizer.encode(templated(byte_tokenizer, HELLO)))
    backend = FakeBackend(vocab_size=len(byte_tokenizer), fail_prompts=[prompt_ids])
    client = await serve_state(make_state(backend))
    response = await client.post("/v1/chat/completions", json={"messages": HELLO})
    assert_openai_error(response, 424, "generation")
    body = {"messages": HELLO, "stream": True}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    (event,) = sse_events(response.text)
    assert event["error"]["type"] == "generation"
    assert set(event["error"]) == {"message", "type", "param", "code"}


# ---- structured output and tools reach the validator as TGI grammars --------------


@pytest.mark.parametrize(
    ("response_format", "grammar"),
    [
        (
            {"type": "json", "value": {"type": "object"}},
            {"type": "json", "value": {"type": "object"}},
        ),
        ({"type": "json_object"}, {"type": "json", "value": {"type": "object"}}),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer"}, "strict": True},
            },
            {"type": "json", "value": {"type": "integer"}},
        ),
        ({"type": "regex", "value": "[ab]+"}, {"type": "regex", "value": "[ab]+"}),
        ({"type": "text"}, None),
    ],
)
async def test_response_format_becomes_a_grammar(
    make_state: Any,
    serve_state: Any,
    monkeypatch: pytest.MonkeyPatch,
    response_format: dict[str, Any],
    grammar: dict[str, Any] | None,
) -> None:
    state = make_state()
    spy = ParamsSpy(state, monkeypatch)
    client = await serve_state(state)
    body = {"messages": HELLO, "max_tokens": 2, "response_format": response_format}
    await client.post("/v1/chat/completions", json=body)
    assert spy.calls[-1][1].grammar == grammar


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


async def test_tools_put_the_tool_prompt_in_the_chat_and_a_grammar_on_it(
    make_state: Any, serve_state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = make_state(max_total_tokens=1024)
    spy = ParamsSpy(state, monkeypatch)
    client = await serve_state(state)
    body = {"messages": HELLO, "max_tokens": 2, "tools": [WEATHER], "tool_choice": "required"}
    await client.post("/v1/chat/completions", json=body)
    inputs, params = spy.calls[-1]
    assert "hello\n---\nGiven the functions available" in inputs
    assert '"get_weather"' in inputs
    assert isinstance(params.grammar, dict) and params.grammar["type"] == "json"
    function = params.grammar["value"]["properties"]["function"]
    assert function["properties"]["_name"] == {"type": "string", "const": "get_weather"}


async def test_tool_errors(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    body = {
        "messages": HELLO,
        "tools": [WEATHER],
        "response_format": {"type": "json_object"},
    }
    response = await client.post("/v1/chat/completions", json=body)
    message = assert_openai_error(response, 422, "tool_error")
    assert message == "Tool error: Grammar and tools are mutually exclusive"
    body = {
        "messages": HELLO,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert (
        assert_openai_error(response, 422, "tool_error")
        == "Tool error: Tool with name nope not found"
    )


async def test_tool_choice_none_is_a_plain_chat(
    make_state: Any, serve_state: Any, monkeypatch: pytest.MonkeyPatch, byte_tokenizer: Any
) -> None:
    state = make_state()
    spy = ParamsSpy(state, monkeypatch)
    client = await serve_state(state)
    body = {"messages": HELLO, "max_tokens": 2, "tools": [WEATHER], "tool_choice": "none"}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    inputs, params = spy.calls[-1]
    assert inputs == templated(byte_tokenizer, HELLO) and params.grammar is None


# ---- /v1/completions -----------------------------------------------------------------


async def test_completion_of_one_prompt(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    body = {"prompt": "hello", "max_tokens": 5, "temperature": 0}
    completion = (await client.post("/v1/completions", json=body)).json()
    schemas.validate("CompletionFinal", completion)
    assert completion["object"] == "text_completion"
    assert completion["id"].startswith("cmpl-")
    assert completion["choices"] == [
        {
            "index": 0,
            "text": greedy_text(byte_tokenizer, "hello", 5),
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert completion["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


async def test_completion_of_a_list_of_prompts(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    body = {"prompt": ["hello", "abc"], "max_tokens": 3, "temperature": 0, "echo": True}
    completion = (await client.post("/v1/completions", json=body)).json()
    schemas.validate("CompletionFinal", completion)
    texts = [choice["text"] for choice in completion["choices"]]
    assert texts == [p + greedy_text(byte_tokenizer, p, 3) for p in ("hello", "abc")]
    assert [choice["index"] for choice in completion["choices"]] == [0, 1]
    assert completion["usage"] == {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}


async def test_completion_logprobs_are_openai_shaped(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    choice = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == 3 and len(logprobs["top_logprobs"]) == 3
    assert all(math.isclose(lp, TOP_LOGPROB, rel_tol=1e-4) for lp in logprobs["token_logprobs"])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])


async def test_completion_stream_of_two_prompts(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    body = {
        "prompt": ["hello", "abc"],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await client.post("/v1/completions", json=body)
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    texts = {0: "", 1: ""}
    finishes: dict[int, list[str | None]] = {0: [], 1: []}
    for chunk in events[:-2]:
        (choice,) = chunk["choices"]
        # null until the end, as OpenAI sends it (TGI's schema wants "")
        schemas.validate("Chunk", {**chunk, "choices": [{**choice, "finish_reason": "x"}]})
        texts[choice["index"]] += choice["text"]
        finishes[choice["index"]].append(choice["finish_reason"])
    for index, prompt in enumerate(("hello", "abc")):
        # A stream never sends half a UTF-8 character, so a trailing U+FFFD is missing.
        whole = greedy_text(byte_tokenizer, prompt, 4)
        assert texts[index] in (whole, whole.removesuffix("\ufffd")) and texts[index]
    assert finishes == {0: [None, None, None, "length"], 1: [None, None, None, "length"]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"suffix": "x"},
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
        ),
        ({"prompt": ["a"] * 5}, "Number of prompts exceeds the maximum allowed batch size of 4"),
        ({"prompt": []}, "`prompt` cannot be empty"),
        ({"prompt": ""}, "`inputs` cannot be empty"),
        ({"n": 3}, "`n` must be 1"),
        ({"best_of": 2}, "`best_of` is not supported"),
    ],
)
async def test_completion_validation_errors(
    make_state: Any, serve_state: Any, body: dict[str, Any], message: str
) -> None:
    client = await serve_state(make_state())
    response = await client.post("/v1/completions", json={"prompt": "hi", **body})
    got = assert_openai_error(response, 422, "validation")
    assert got.startswith(f"Input validation error: {message}")


# ---- /v1/models, /chat_tokenize, /invocations ----------------------------------------


async def test_models(make_state: Any, serve_state: Any, schemas: Any) -> None:
    client = await serve_state(make_state())
    listing = (await client.get("/v1/models")).json()
    schemas.validate("ModelInfo", listing)
    assert listing["id"] == "fake/model" and listing["object"] == "model"
    assert [model["id"] for model in listing["data"]] == ["fake/model"]
    one = await client.get("/v1/models/fake/model")
    schemas.validate("ModelInfo", one.json())
    assert_openai_error(await client.get("/v1/models/other"), 404, "not_found")


async def test_chat_tokenize(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post("/chat_tokenize", json={"messages": HELLO})
    assert response.status_code == 200
    body = response.json()
    schemas.validate("ChatTokenizeResponse", body)
    text = templated(byte_tokenizer, HELLO)
    assert body["templated_text"] == text
    tokens = body["tokenize_response"]
    assert [token["id"] for token in tokens] == byte_tokenizer.encode(text)
    assert "".join(token["text"] for token in tokens) == text
    broken = await client.post("/chat_tokenize", json={"messages": []})
    assert broken.status_code == 422
    assert broken.json()["error_type"] == "template_error"


async def test_invocations_dispatch_on_the_body(
    make_state: Any, serve_state: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    chat = await client.post("/invocations", json={"messages": HELLO, "max_tokens": 2})
    schemas.validate("SagemakerResponse", chat.json())
    assert chat.json()["object"] == "chat.completion"
    completion = await client.post("/invocations", json={"prompt": "hi", "max_tokens": 2})
    schemas.validate("SagemakerResponse", completion.json())
    assert completion.json()["object"] == "text_completion"
    generate = await client.post(
        "/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    )
    assert list(generate.json()[0]) == ["generated_text"]
    stream = await client.post(
        "/invocations", json={"messages": HELLO, "max_tokens": 2, "stream": True}
    )
    events = sse_events(stream.text)
    assert events[-1] == "[DONE]"
    schemas.validate("SagemakerStreamResponse", events[0])
    # TGI's error shape here, not OpenAI's.
    bad = await client.post("/invocations", json={"messages": HELLO, "n": 2})
    assert bad.status_code == 422
    schemas.validate("ErrorResponse", bad.json())
    assert bad.json()["error_type"] == "validation"
    not_json = await client.post(
        "/invocations", content=b"{x", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400


async def test_a_client_leaving_a_stream_cancels_its_requests(
    make_state: Any, stream_client: Any, byte_tokenizer: Any, step_permits: Any
) -> None:
    import asyncio

    permits = step_permits(3)  # prefill plus a couple of decodes, then a pause
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=permits)
    state = make_state(backend)
    client = await stream_client(state)
    body = {"prompt": ["hello", "abc"], "max_tokens": 100, "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
        # leaving the block closes the stream: the client is gone
        permits.grant(10_000)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while state.router.stats().kv.used_tokens or state.router.stats().batch_size:
            assert loop.time() < deadline, "the requests were not cancelled"
            await asyncio.sleep(0)
    finally:
        permits.grant(10_000)
    assert not backend.kv


async def test_every_openai_route_of_the_spec_is_served(
    make_state: Any, serve_state: Any, openapi: dict[str, Any]
) -> None:
    client = await serve_state(make_state())
    served = set((await client.get("/openapi.json")).json()["paths"])
    wanted = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/chat_tokenize"}
    assert wanted | {"/invocations"} <= served
    assert set(openapi["paths"]) <= served


async def test_chat_timing_headers_and_guideline(
    make_state: Any, serve_state: Any, monkeypatch: pytest.MonkeyPatch, byte_tokenizer: Any
) -> None:
    state = make_state()
    spy = ParamsSpy(state, monkeypatch)
    client = await serve_state(state)
    monkeypatch.setattr(
        byte_tokenizer,
        "chat_template",
        "{{ guideline }}|{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    body = {"messages": HELLO, "max_tokens": 3, "guideline": "be safe"}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert spy.calls[-1][0] == "be safe|hello"
    assert response.headers["x-generated-tokens"] == "3"
    assert response.headers["x-compute-type"] == state.model.device_type


async def test_the_openai_sdk_raises_its_typed_exceptions(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    openai = pytest.importorskip("openai", reason="the `openai` SDK is in the test extra")
    prompt_ids = tuple(byte_tokenizer.encode(templated(byte_tokenizer, HELLO)))
    backend = FakeBackend(vocab_size=len(byte_tokenizer), fail_prompts=[prompt_ids])
    http = await serve_state(make_state(backend, max_concurrent_requests=1))
    sdk = openai.AsyncOpenAI(
        base_url="http://tgi/v1", api_key="unused", http_client=http, max_retries=0
    )
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        await sdk.chat.completions.create(model="m", messages=HELLO, temperature=-1.0)  # type: ignore[arg-type]
    assert invalid.value.body["type"] == "validation"
    assert "`temperature` must be strictly positive" in invalid.value.message
    with pytest.raises(openai.RateLimitError):
        await sdk.completions.create(model="m", prompt=["a", "b"], max_tokens=1)
    with pytest.raises(openai.APIStatusError) as failed:
        await sdk.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    assert failed.value.status_code == 424
    stream = await sdk.chat.completions.create(model="m", messages=HELLO, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="injected failure"):
        async for _ in stream:
            pass
    completion = await sdk.completions.create(model="m", prompt="hi", max_tokens=2)
    assert completion.usage is not None and completion.usage.completion_tokens == 2
