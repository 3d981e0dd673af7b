"""POST /generate, /generate_stream and `/` against the fake backend, checked against
TGI's OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Callable
from typing import Any

import httpx

from tgi.testing.fake_backend import FakeBackend, expected_tokens

# The fake model puts logit 10 on its preferred token and 0 on the other 258 (vocab 259).
TOP_LOGPROB = -math.log1p(258 * math.exp(-10.0))
OTHER_LOGPROB = TOP_LOGPROB - 10.0


def greedy(tokenizer: Any, prompt: str, num_tokens: int) -> tuple[list[int], str]:
    """The fake model's greedy ids and generated_text (no EOS in the prompts used here)."""
    ids = expected_tokens(tokenizer.encode(prompt), num_tokens, len(tokenizer))
    assert tokenizer.eos_token_id not in ids, "pick a prompt that does not reach EOS"
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def parse_sse(body: str) -> list[dict[str, Any]]:
    """The JSON payload of every `data:` event of a Server-Sent Events body."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data:"), f"not a data event: {block!r}"
        events.append(json.loads(block.removeprefix("data:")))
    return events


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Yield to the loop until `condition()` holds, bounded in time (never sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0)


def in_flight(state: Any) -> int:
    stats = state.router.stats()
    return stats.queue_size + stats.batch_size


# ---- /generate --------------------------------------------------------------------


async def test_generate_returns_only_the_greedy_text(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 7}}
    )
    assert response.status_code == 200
    _, text = greedy(byte_tokenizer, "hello", 7)
    assert response.json() == {"generated_text": text}
    schemas.validate("GenerateResponse", response.json())


async def test_generate_details(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/generate",
        json={"inputs": "Hello world", "parameters": {"max_new_tokens": 9, "details": True}},
    )
    assert response.status_code == 200
    body = response.json()
    schemas.validate("GenerateResponse", body)
    ids, text = greedy(byte_tokenizer, "Hello world", 9)
    assert body["generated_text"] == text
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 9
    assert details["seed"] is None  # greedy
    assert details["prefill"] == []  # decoder_input_details not asked
    assert [token["id"] for token in details["tokens"]] == ids
    assert all(token["special"] is False for token in details["tokens"])
    for token in details["tokens"]:
        assert math.isclose(token["logprob"], TOP_LOGPROB, rel_tol=1e-4)
    # Per-token texts are the stream's deltas: they spell the output, except a trailing
    # incomplete UTF-8 character, which no delta ever carries (as in TGI).
    deltas = "".join(token["text"] for token in details["tokens"])
    assert deltas and byte_tokenizer.decode(ids).startswith(deltas)


async def test_generate_stops_at_eos_with_eos_reason(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    eos, vocab = byte_tokenizer.eos_token_id, len(byte_tokenizer)
    prompt = next(
        p
        for p in (c * n for c in "abcdefghij" for n in range(1, 100))
        if eos in expected_tokens(byte_tokenizer.encode(p), 8, vocab)
    )
    ids = expected_tokens(byte_tokenizer.encode(prompt), 8, vocab)
    ids = ids[: ids.index(eos) + 1]
    client = await serve_state(make_state())
    response = await client.post(
        "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
    )
    body = response.json()
    assert body["details"]["finish_reason"] == "eos_token"
    assert body["details"]["generated_tokens"] == len(ids)
    assert body["details"]["tokens"][-1] | {"logprob": None} == {
        "id": eos,
        "text": "<|im_end|>",
        "logprob": None,
        "special": True,
    }
    # generated_text skips special tokens, as TGI's does.
    assert body["generated_text"] == byte_tokenizer.decode(ids[:-1])


async def test_decoder_input_details_gives_the_prompt_tokens(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/generate",
        json={
            "inputs": "hey you",
            "parameters": {"max_new_tokens": 2, "details": True, "decoder_input_details": True},
        },
    )
    body = response.json()
    schemas.validate("GenerateResponse", body)
    prompt_ids = byte_tokenizer.encode("hey you")
    prefill = body["details"]["prefill"]
    assert [token["id"] for token in prefill] == prompt_ids
    assert [token["text"] for token in prefill] == list("hey you")
    assert prefill[0]["logprob"] is None  # nothing precedes the first token
    for i, token in enumerate(prefill[1:], start=1):
        # The logprob the fake model gave this prompt token after the ones before it.
        preferred = expected_tokens(prompt_ids[:i], 1, len(byte_tokenizer))[0]
        want = TOP_LOGPROB if token["id"] == preferred else OTHER_LOGPROB
        assert math.isclose(token["logprob"], want, rel_tol=1e-4), (i, token)


async def test_return_full_text_prepends_the_prompt(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/generate",
        json={"inputs": "hello", "parameters": {"max_new_tokens": 4, "return_full_text": True}},
    )
    _, text = greedy(byte_tokenizer, "hello", 4)
    assert response.json() == {"generated_text": "hello" + text}


# ---- /generate_stream ----------------------------------------------------------------


async def test_generate_stream_events(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/generate_stream", json={"inputs": "stream me", "parameters": {"max_new_tokens": 6}}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    for event in events:
        schemas.validate("StreamResponse", event)
    ids, text = greedy(byte_tokenizer, "stream me", 6)
    assert [event["index"] for event in events] == [1, 2, 3, 4, 5, 6]
    assert [event["token"]["id"] for event in events] == ids
    assert [event["generated_text"] for event in events[:-1]] == [None] * 5
    assert events[-1]["generated_text"] == text
    assert all(event["details"] is None for event in events)


async def test_generate_stream_details_only_on_the_last_event(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/generate_stream",
        json={"inputs": "stream me", "parameters": {"max_new_tokens": 4, "details": True}},
    )
    events = parse_sse(response.text)
    for event in events:
        schemas.validate("StreamResponse", event)
    assert [event["details"] for event in events[:-1]] == [None] * 3
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 4,
        "input_length": len("stream me"),
        "seed": None,
    }


# ---- POST / ---------------------------------------------------------------------------


async def test_compat_route_without_stream_returns_a_one_element_list(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, openapi: dict[str, Any], schemas: Any
) -> None:
    client = await serve_state(make_state())
    parameters = {"max_new_tokens": 3, "return_full_text": False}
    response = await client.post(
        "/", json={"inputs": "hello", "parameters": parameters, "stream": False}
    )
    assert response.status_code == 200
    body = response.json()
    _, text = greedy(byte_tokenizer, "hello", 3)
    assert body == [{"generated_text": text}]
    declared = openapi["paths"]["/"]["post"]["responses"]["200"]["content"]["application/json"]
    assert declared["schema"]["type"] == "array"
    schemas.validate("GenerateResponse", body[0])


async def test_compat_route_with_stream_returns_events(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.post(
        "/", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}, "stream": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    for event in events:
        schemas.validate("StreamResponse", event)
    ids, text = greedy(byte_tokenizer, "hello", 3)
    assert [event["token"]["id"] for event in events] == ids
    # TGI's compat route defaults return_full_text to true for text-generation models.
    assert events[-1]["generated_text"] == "hello" + text


async def test_compat_route_returns_the_full_text_unless_told_otherwise(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    client = await serve_state(make_state())
    _, text = greedy(byte_tokenizer, "hello", 3)
    default = await client.post("/", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    assert default.json() == [{"generated_text": "hello" + text}]
    generate = await client.post(
        "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}
    )
    assert generate.json() == {"generated_text": text}  # /generate defaults to false


async def test_the_schema_check_rejects_a_malformed_body(schemas: Any) -> None:
    # Guards the tests above against a validator that accepts anything.
    assert schemas.errors("GenerateResponse", {"details": None})
    assert schemas.errors("StreamResponse", {"index": 1, "token": {"id": 1}})
    token = {"id": 1, "text": "a", "logprob": None, "special": False}
    assert not schemas.errors("StreamResponse", {"index": 1, "token": token})
    assert schemas.errors("StreamResponse", {"index": 1, "token": token, "generated_text": 3})


# ---- failures ---------------------------------------------------------------------------


async def test_a_backend_failure_gives_424_while_a_concurrent_request_completes(
    make_state: Any, stream_client: Any, byte_tokenizer: Any, step_permits: Any, schemas: Any
) -> None:
    permits = step_permits(2)  # the good request's prefill and first decode, then a pause
    backend = FakeBackend(
        vocab_size=len(byte_tokenizer),
        fail_prompts=[tuple(byte_tokenizer.encode("poison"))],
        step_gate=permits,
    )
    state = make_state(backend)
    client = await stream_client(state)
    good_body = {"inputs": "fine", "parameters": {"max_new_tokens": 30}}
    try:
        async with client.stream("POST", "/generate_stream", json=good_body) as good:
            lines = good.aiter_lines()
            first = await anext(lines)
            bad = asyncio.ensure_future(
                client.post("/generate", json={"inputs": "poison", "parameters": {}})
            )
            await wait_until(lambda: in_flight(state) == 2)  # queued or already prefilling
            permits.grant(10_000)
            bad_response = await bad
            rest = [line async for line in lines]
    finally:
        permits.grant(10_000)
    assert bad_response.status_code == 424
    error = bad_response.json()
    schemas.validate("ErrorResponse", error)
    assert error["error_type"] == "generation"
    assert error["error"].startswith("Request failed during generation: injected failure")
    events = parse_sse("\n".join([first, *rest]) + "\n")
    ids, text = greedy(byte_tokenizer, "fine", 30)
    assert [event["token"]["id"] for event in events] == ids
    assert events[-1]["generated_text"] == text
    await wait_until(lambda: state.router.stats().kv.used_tokens == 0)
    assert not backend.kv


async def test_a_backend_failure_in_a_stream_is_an_error_event(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    backend = FakeBackend(
        vocab_size=len(byte_tokenizer), fail_prompts=[tuple(byte_tokenizer.encode("poison"))]
    )
    client = await serve_state(make_state(backend))
    response = await client.post("/generate_stream", json={"inputs": "poison"})
    events = parse_sse(response.text)
    assert len(events) == 1
    schemas.validate("ErrorResponse", events[0])
    assert events[0]["error_type"] == "generation"
    assert "injected failure" in events[0]["error"]


async def test_overloaded_at_max_concurrent_requests(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    gate = threading.Event()  # not set: the first request stays in flight
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=gate)
    state = make_state(backend, max_concurrent_requests=1)
    client = await serve_state(state)
    body = {"inputs": "first", "parameters": {"max_new_tokens": 3}}
    first = asyncio.ensure_future(client.post("/generate", json=body))
    try:
        await wait_until(lambda: in_flight(state) == 1)
        overloaded = await client.post("/generate", json=body)
        overloaded_stream = await client.post("/generate_stream", json=body)
    finally:
        gate.set()
    assert overloaded.status_code == 429
    assert overloaded.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    schemas.validate("ErrorResponse", overloaded.json())
    # TGI's generate_stream answers 200 and reports the overload inside the stream.
    assert overloaded_stream.status_code == 200
    assert parse_sse(overloaded_stream.text) == [
        {"error": "Model is overloaded", "error_type": "overloaded"}
    ]
    registry = state.metrics.registry
    assert registry.get_sample_value("tgi_request_failure_total", {"err": "overloaded"}) == 2
    first_response = await first
    assert first_response.status_code == 200
    _, text = greedy(byte_tokenizer, "first", 3)
    assert first_response.json() == {"generated_text": text}


# ---- sampling through HTTP ---------------------------------------------------------------


def sampled(seed: int, **extra: Any) -> dict[str, Any]:
    # Temperature 5 flattens the fake model's logits: most draws are not its argmax.
    parameters = {"do_sample": True, "temperature": 5.0, "seed": seed, "max_new_tokens": 20}
    return {"inputs": "sample me", "parameters": parameters | {"details": True} | extra}


def token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


async def test_same_seed_same_tokens_alone_and_in_a_busy_batch(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    gate = threading.Event()
    gate.set()
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=gate)
    state = make_state(backend)
    client = await serve_state(state)
    alone = await client.post("/generate", json=sampled(1234))
    again = await client.post("/generate", json=sampled(1234))
    other_seed = await client.post("/generate", json=sampled(4321))

    # Now with companions: hold the backend so all four are queued before the first step
    # ends, then let them share the batch.
    gate.clear()
    companions = [
        {"inputs": "other", "parameters": {"max_new_tokens": 20}},
        sampled(7, top_k=5),
        sampled(99, top_p=0.5, temperature=0.7),
    ]
    tasks = [asyncio.ensure_future(client.post("/generate", json=body)) for body in companions]
    try:
        await wait_until(lambda: in_flight(state) == 3)
        target = asyncio.ensure_future(client.post("/generate", json=sampled(1234)))
        await wait_until(lambda: in_flight(state) == 4)
    finally:
        gate.set()
    busy = await target
    await asyncio.gather(*tasks)

    assert token_ids(alone) == token_ids(again) == token_ids(busy)
    assert alone.json()["generated_text"] == busy.json()["generated_text"]
    assert alone.json()["details"]["seed"] == 1234
    assert token_ids(other_seed) != token_ids(alone)
    greedy_ids, _ = greedy(byte_tokenizer, "sample me", 20)
    assert token_ids(alone) != greedy_ids
    widest = max(len(ids) for method, ids in backend.calls if method == "decode")
    assert widest == 4, "the seeded request never shared a decode step with its companions"


async def test_a_seed_anywhere_in_the_u64_range_works(
    make_state: Any, serve_state: Any, schemas: Any
) -> None:
    # TGI's seed is a u64; the sampler stores seeds as int64.
    client = await serve_state(make_state())
    top = 2**64 - 1
    response = await client.post("/generate", json=sampled(top, max_new_tokens=3))
    assert response.status_code == 200, response.text
    assert response.json()["details"]["seed"] == top
    schemas.validate("GenerateResponse", response.json())
    too_big = await client.post("/generate", json=sampled(top + 1))
    assert too_big.status_code == 422
    assert too_big.json()["error_type"] == "validation"


async def test_temperature_alone_turns_sampling_on(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    # TGI samples whenever a warper (temperature, top_k, top_p) is set, even without
    # do_sample (text_generation_server.utils.tokens.HeterogeneousNextTokenChooser).
    client = await serve_state(make_state())
    body = sampled(5)
    del body["parameters"]["do_sample"]
    response = await client.post("/generate", json=body)
    assert response.json()["details"]["seed"] == 5
    greedy_ids, _ = greedy(byte_tokenizer, "sample me", 20)
    assert token_ids(response) != greedy_ids
    with_flag = await client.post("/generate", json=sampled(5))
    assert token_ids(response) == token_ids(with_flag)
