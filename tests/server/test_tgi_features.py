"""TGI's parameters end to end against the fake backend: top-n tokens, best_of, details,
defaults, keep-alive comments and the /metrics exposition."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from tgi.server.schemas import GenerateRequest
from tgi.testing.fake_backend import FakeBackend

from .test_generate_routes import OTHER_LOGPROB, TOP_LOGPROB, greedy, parse_sse


async def test_top_n_tokens_in_details_and_in_the_stream(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    parameters = {"max_new_tokens": 4, "top_n_tokens": 3, "details": True}
    body = (
        await client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    ).json()
    schemas.validate("GenerateResponse", body)
    ids, _ = greedy(byte_tokenizer, "hello", 4)
    top_tokens = body["details"]["top_tokens"]
    assert len(top_tokens) == 4
    for step, (chosen, top) in enumerate(zip(ids, top_tokens, strict=True)):
        assert len(top) == 3
        assert top[0]["id"] == chosen, step  # the fake model's favourite, then the rest
        assert math.isclose(top[0]["logprob"], TOP_LOGPROB, rel_tol=1e-4)
        assert all(math.isclose(t["logprob"], OTHER_LOGPROB, rel_tol=1e-4) for t in top[1:])
        assert all(t["text"] == byte_tokenizer.decode([t["id"]]) for t in top)
    stream = await client.post(
        "/generate_stream", json={"inputs": "hello", "parameters": parameters}
    )
    events = parse_sse(stream.text)
    for event in events:
        schemas.validate("StreamResponse", event)
    assert [event["top_tokens"] for event in events] == top_tokens


async def test_no_top_tokens_key_unless_asked(make_state: Any, serve_state: Any) -> None:
    # TGI skips empty `top_tokens` (serde skip_serializing_if), in details and events.
    client = await serve_state(make_state())
    parameters = {"max_new_tokens": 2, "details": True}
    body = (
        await client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    ).json()
    assert set(body["details"]) == {
        "finish_reason",
        "generated_tokens",
        "seed",
        "prefill",
        "tokens",
    }
    stream = await client.post(
        "/generate_stream", json={"inputs": "hello", "parameters": parameters}
    )
    assert all(
        set(e) == {"index", "token", "generated_text", "details"} for e in parse_sse(stream.text)
    )


async def test_best_of_returns_the_best_mean_logprob_and_the_others(
    make_state: Any, serve_state: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    parameters = {
        "best_of": 2,
        "temperature": 5.0,
        "max_new_tokens": 6,
        "details": True,
        "top_n_tokens": 1,
    }
    response = await client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    assert response.status_code == 200, response.text
    body = response.json()
    schemas.validate("GenerateResponse", body)
    details = body["details"]
    (other,) = details["best_of_sequences"]
    schemas.validate("BestOfSequence", other)

    def mean(tokens: list[dict[str, Any]]) -> float:
        return sum(token["logprob"] for token in tokens) / len(tokens)

    assert mean(details["tokens"]) >= mean(other["tokens"])
    assert details["seed"] != other["seed"] and None not in (details["seed"], other["seed"])
    assert len(other["top_tokens"]) == other["generated_tokens"]
    # Without details, only the winner's text comes back.
    parameters["details"] = False
    plain = await client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    assert set(plain.json()) == {"generated_text"}


async def test_best_of_takes_as_many_slots_as_sequences(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(max_concurrent_requests=1))
    parameters = {"best_of": 2, "do_sample": True, "max_new_tokens": 2}
    response = await client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    assert response.status_code == 429
    assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}


async def test_decoder_input_details_alone_turns_details_on(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    # TGI: details = parameters.details || parameters.decoder_input_details
    client = await serve_state(make_state())
    parameters = {"max_new_tokens": 2, "decoder_input_details": True}
    body = (await client.post("/generate", json={"inputs": "hey", "parameters": parameters})).json()
    assert [token["id"] for token in body["details"]["prefill"]] == byte_tokenizer.encode("hey")


async def test_without_parameters_tgi_samples(make_state: Any, serve_state: Any) -> None:
    # TGI's default_parameters() has do_sample = true; an empty object does not sample.
    client = await serve_state(make_state())
    absent = await client.post("/generate_stream", json={"inputs": "hello"})
    empty = await client.post(
        "/generate_stream", json={"inputs": "hello", "parameters": {"details": True}}
    )
    absent_events, empty_events = parse_sse(absent.text), parse_sse(empty.text)
    assert GenerateRequest.model_validate({"inputs": "x"}).parameters.do_sample is True
    given = {"inputs": "x", "parameters": {}}
    assert GenerateRequest.model_validate(given).parameters.do_sample is False
    assert empty_events[-1]["details"]["seed"] is None
    # max_new_tokens defaults to the rest of max_total_tokens (256 - 5)
    assert len(empty_events) == 251 or empty_events[-1]["details"]["finish_reason"] == "eos_token"
    assert absent_events[-1]["generated_text"] is not None
    null = await client.post("/generate", json={"inputs": "hi", "parameters": None})
    assert null.status_code == 200


async def test_null_fields_mean_not_given(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    parameters = {
        "do_sample": None,
        "stop": None,
        "details": None,
        "watermark": None,
        "decoder_input_details": None,
        "max_new_tokens": 2,
    }
    response = await client.post("/generate", json={"inputs": "hi", "parameters": parameters})
    assert response.status_code == 200, response.text


async def test_generate_sends_tgis_timing_headers(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}
    )
    assert response.headers["x-generated-tokens"] == "3"
    assert response.headers["x-prompt-tokens"] == "5"
    assert int(response.headers["x-total-time"]) >= 0


async def test_a_silent_stream_sends_keep_alive_comments(
    make_state: Any, stream_client: Any, byte_tokenizer: Any
) -> None:
    gate = threading.Event()  # closed: no step finishes until the comments arrived
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=gate)
    client = await stream_client(make_state(backend, sse_keep_alive_s=0.01))
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            lines = response.aiter_lines()
            first, blank = await anext(lines), await anext(lines)
            gate.set()
            rest = [line async for line in lines]
    finally:
        gate.set()
    assert (first, blank) == (":", "")
    events = [line for line in rest if line.startswith("data:")]
    assert len(events) == 2
    assert all(line in (":", "") for line in rest if not line.startswith("data:"))


async def test_metrics_use_tgis_names_and_parse(make_state: Any, serve_state: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client = await serve_state(make_state())
    await client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    text = (await client.get("/metrics")).text
    assert "\ntgi_request_count 1\n" in text and "_total" not in text and "_created" not in text
    assert "# TYPE tgi_request_count counter" in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_request_duration",
        "tgi_request_validation_duration",
        "tgi_request_queue_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_generated_tokens",
        "tgi_request_input_length",
        "tgi_request_max_new_tokens",
        "tgi_batch_forward_duration",
    ):
        assert name in families, name
    success = families["tgi_request_success"].samples
    assert [(s.name, s.value) for s in success] == [("tgi_request_success_total", 1.0)]
    forward = {s.labels.get("method") for s in families["tgi_batch_forward_duration"].samples}
    assert {"prefill", "decode"} <= forward


@pytest.mark.parametrize("route", ["/generate", "/"])
async def test_grammar_is_refused_clearly(make_state: Any, serve_state: Any, route: str) -> None:
    state = make_state()
    state.validator.grammars = None  # a tokenizer llguidance cannot read
    client = await serve_state(state)
    body = {"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}
    response = await client.post(route, json=body)
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: grammar is not supported",
        "error_type": "validation",
    }
