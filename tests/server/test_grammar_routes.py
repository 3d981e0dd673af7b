"""`grammar` over HTTP on the fake backend: constrained output, TGI's 422 bodies."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any

import jsonschema
import pytest

from tgi.testing.fake_backend import expected_tokens

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}


def body(grammar: Any, max_new_tokens: int = 64, **parameters: Any) -> dict[str, Any]:
    return {
        "inputs": "hello",
        "parameters": {
            "grammar": grammar,
            "max_new_tokens": max_new_tokens,
            "details": True,
            **parameters,
        },
    }


async def stream_events(client: Any, payload: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    async with client.stream("POST", "/generate_stream", json=payload) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


async def test_regex_grammar_on_generate(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    response = await client.post("/generate", json=body({"type": "regex", "value": "[a-c]{3}-"}))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert re.fullmatch("[a-c]{3}-", answer["generated_text"])
    assert answer["details"]["finish_reason"] == "eos_token"
    assert answer["details"]["generated_tokens"] == 5  # four bytes and EOS


@pytest.mark.parametrize("kind", ["json", "json_schema"])
async def test_json_grammar_on_generate_stream(
    make_state: Any, serve_state: Any, kind: str
) -> None:
    client = await serve_state(make_state())
    value = SCHEMA if kind == "json" else {"name": "thing", "schema": SCHEMA}
    events = await stream_events(client, body({"type": kind, "value": value}))
    final = events[-1]
    assert final["details"]["finish_reason"] == "eos_token", final
    jsonschema.validate(json.loads(final["generated_text"]), SCHEMA)
    text = "".join(event["token"]["text"] for event in events if not event["token"]["special"])
    assert text == final["generated_text"]


async def test_grammar_and_plain_requests_share_batches(make_state: Any, serve_state: Any) -> None:
    state = make_state()
    client = await serve_state(state)
    prompt_ids = state.tokenizer.encode("hello")
    plain = expected_tokens(prompt_ids, 12, len(state.tokenizer))
    grammar = {"type": "regex", "value": "(yes|no), [0-9]{2}"}
    requests = [
        client.post("/generate", json=body(grammar if i % 2 else None, 12)) for i in range(6)
    ]
    answers = [response.json() for response in await asyncio.gather(*requests)]
    for i, answer in enumerate(answers):
        if i % 2:
            assert re.fullmatch("(yes|no), [0-9]{2}", answer["generated_text"]), answer
            assert answer["details"]["finish_reason"] == "eos_token"
        else:
            assert [token["id"] for token in answer["details"]["tokens"]] == plain


async def test_stop_before_the_grammar_completes_is_a_length_finish(
    make_state: Any, serve_state: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post("/generate", json=body({"type": "regex", "value": "x{9}"}, 4))
    answer = response.json()
    assert answer["generated_text"] == "xxxx"
    assert answer["details"]["finish_reason"] == "length"


INVALID = [
    ({"type": "regex", "value": "[a-"}, 'grammar is not valid: invalid regex "[a-": '),
    ({"type": "json", "value": {"type": "integer", "minimum": 3, "maximum": 1}}, None),
    ({"type": "json", "value": "not json"}, "grammar is not valid: Expecting value"),
    ({"type": "toml", "value": "a"}, "grammar is not valid: unknown grammar type `toml`"),
]


@pytest.mark.parametrize(("grammar", "prefix"), INVALID)
async def test_invalid_grammar_is_a_422(
    make_state: Any, serve_state: Any, grammar: Any, prefix: str | None
) -> None:
    client = await serve_state(make_state())
    response = await client.post("/generate", json=body(grammar))
    assert response.status_code == 422
    answer = response.json()
    assert answer["error_type"] == "validation"
    expected = "Input validation error: " + (
        prefix or "grammar is not valid: Unsatisfiable schema: minimum (3) is greater than"
    )
    assert answer["error"].startswith(expected), answer


async def test_invalid_grammar_on_the_stream_is_an_error_event(
    make_state: Any, serve_state: Any
) -> None:
    client = await serve_state(make_state())
    events = await stream_events(client, body({"type": "regex", "value": "(("}))
    assert events == [
        {
            "error": 'Input validation error: grammar is not valid: invalid regex "((": '
            "unclosed group",
            "error_type": "validation",
        }
    ]


async def test_grammars_compile_on_a_worker_thread_once(make_state: Any, serve_state: Any) -> None:
    """Never on the event loop (it would block HTTP) nor the engine (it would stall
    every row's decoding); the second identical request hits the cache."""
    state = make_state()
    compiler = state.validator.grammars
    threads: list[str] = []
    build = compiler._build

    def recording_build(kind: str, text: str) -> Any:
        threads.append(threading.current_thread().name)
        return build(kind, text)

    compiler._build = recording_build
    client = await serve_state(state)
    for _ in range(2):
        response = await client.post("/generate", json=body({"type": "regex", "value": "ok"}))
        assert response.json()["generated_text"] == "ok"
    assert len(threads) == 1
    assert threads[0] != threading.main_thread().name
    assert not threads[0].startswith("tgi-engine")
