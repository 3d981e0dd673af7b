"""Parameter types as TGI declares them (i32, u32, u64, finite f32, strict JSON types),
refused when the body is parsed, on TGI's routes and on OpenAI's.

TGI's serde refuses a value its Rust type cannot hold before validating anything, so one
request can never carry, say, a `top_k` past int64 into a batch it shares with others.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from tgi.testing.fake_backend import FakeBackend

I32_MAX = 2**31 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
F32_MAX = 3.4028234663852886e38
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def client(make_state: Any, serve_state: Any) -> Any:
    return await serve_state(make_state())


def raw_json(body: dict[str, Any]) -> dict[str, Any]:
    """httpx keyword arguments posting `body` as JSON, NaN and Infinity written as Python's
    json module writes them (httpx refuses to)."""
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


def assert_parse_error(response: Any, field: str) -> None:
    """TGI's 422 body, naming the parameter the body cannot hold."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == "validation"
    assert body["error"].startswith((f"{field}: ", f"{field}.")), body["error"]  # stop.0


def assert_openai_parse_error(response: Any, field: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("validation", field)


# ---- TGI's routes -------------------------------------------------------------------

# (parameter, a value its TGI type cannot hold, or a JSON type serde does not coerce)
REFUSED_AT_PARSING = [
    ("top_k", 9223372036854775808),  # past int64: overflowed the sampler's tensor
    ("top_k", I32_MAX + 1),  # i32
    ("top_k", -(2**31) - 1),
    ("top_k", 10.0),
    ("max_new_tokens", "10"),  # u32
    ("max_new_tokens", -1),
    ("max_new_tokens", U32_MAX + 1),
    ("top_n_tokens", -1),  # u32
    ("top_n_tokens", U32_MAX + 1),
    ("best_of", -1),  # usize
    ("best_of", U64_MAX + 1),
    ("truncate", -1),  # usize
    ("truncate", U64_MAX + 1),
    ("seed", -1),  # u64
    ("seed", U64_MAX + 1),
    ("seed", "7"),
    ("details", "yes"),
    ("decoder_input_details", 1),
    ("do_sample", "true"),
    ("watermark", 0),
    ("return_full_text", "no"),
    ("ignore_eos", 1),
    ("temperature", "1.0"),
    ("temperature", True),
    ("stop", "stop here"),
    ("stop", [1]),
    ("adapter_id", 5),
]

FLOATS = ["temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"]
NOT_FINITE = [float("nan"), float("inf"), float("-inf"), 1e39, -1e39]  # 1e39: past f32


@pytest.mark.parametrize(("name", "value"), REFUSED_AT_PARSING)
async def test_a_value_tgi_s_type_cannot_hold_is_refused(
    client: Any, name: str, value: Any
) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2, name: value}}
    response = await client.post("/generate", json=body)
    assert_parse_error(response, f"parameters.{name}")


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", NOT_FINITE)
async def test_a_float_must_be_a_finite_f32(client: Any, name: str, value: float) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2, name: value}}
    response = await client.post("/generate", **raw_json(body))
    assert_parse_error(response, f"parameters.{name}")


@pytest.mark.parametrize(
    "parameters",
    [
        {"top_k": I32_MAX},  # the edge of i32: more than the vocabulary, so no filter
        {"seed": U64_MAX, "do_sample": True},
        {"seed": 0, "do_sample": True},
        {"temperature": 1},  # a JSON integer where a float is expected is a float
        {"repetition_penalty": 2},
        {"frequency_penalty": -2},
        {"temperature": F32_MAX},
        {"details": True, "decoder_input_details": False, "watermark": False},
        {"details": None, "stop": None, "top_k": None},  # null: not given
    ],
)
async def test_values_tgi_s_types_hold_are_served(client: Any, parameters: dict) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2} | parameters}
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text


async def test_below_the_type_s_edge_tgi_s_own_message_still_answers(client: Any) -> None:
    # -2**31 is an i32: parsing takes it, validation refuses it with TGI's words
    body = {"inputs": "hello", "parameters": {"top_k": -(2**31)}}
    response = await client.post("/generate", json=body)
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: `top_k` must be strictly positive",
        "error_type": "validation",
    }


@pytest.mark.parametrize("route", ["/generate_stream", "/", "/invocations"])
async def test_every_tgi_route_parses_the_same_types(client: Any, route: str) -> None:
    body = {"inputs": "hello", "parameters": {"top_k": I32_MAX + 1}, "stream": True}
    response = await client.post(route, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"
    assert "top_k" in response.json()["error"]


async def test_the_compat_route_s_stream_flag_is_a_boolean(client: Any) -> None:
    response = await client.post("/", json={"inputs": "hello", "stream": "true"})
    assert_parse_error(response, "stream")


async def test_an_unparsable_top_k_no_longer_fails_its_neighbours(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    # A request in its first step is prefilled with every other newcomer of that step;
    # a row the sampler cannot build failed the whole step, so all of them got a 424.
    gate = threading.Event()
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=gate)
    state = make_state(backend)
    client = await serve_state(state)

    def in_flight() -> int:
        stats = state.router.stats()
        return stats.queue_size + stats.batch_size

    async def until(condition: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not condition():
            assert loop.time() < deadline, "condition never held"
            await asyncio.sleep(0)

    neighbour_body = {"inputs": "fine", "parameters": {"max_new_tokens": 3}}
    bad_body = {"inputs": "fine", "parameters": {"max_new_tokens": 3, "top_k": 2**63}}
    try:
        # the blocker's step holds the backend, so the next two are admitted together
        blocker = asyncio.ensure_future(client.post("/generate", json=neighbour_body))
        await until(lambda: state.router.stats().batch_size == 1)
        neighbour = asyncio.ensure_future(client.post("/generate", json=neighbour_body))
        bad = asyncio.ensure_future(client.post("/generate", json=bad_body))
        await until(lambda: (in_flight() == 2 and bad.done()) or in_flight() == 3)
    finally:
        gate.set()
    responses = await asyncio.gather(blocker, neighbour, bad)
    assert [response.status_code for response in responses] == [200, 200, 422]


# ---- OpenAI's routes -----------------------------------------------------------------

CHAT_REFUSED = [
    ("max_tokens", "10"),
    ("max_tokens", -1),
    ("max_tokens", U32_MAX + 1),
    ("max_completion_tokens", U32_MAX + 1),
    ("n", -1),
    ("n", 1.0),
    ("top_logprobs", -1),
    ("top_logprobs", U32_MAX + 1),
    ("seed", -1),
    ("seed", U64_MAX + 1),
    ("logprobs", "yes"),
    ("stream", 1),
    ("ignore_eos", "false"),
    ("temperature", "0"),
    ("tool_prompt", 3),
]

COMPLETION_REFUSED = [
    ("max_tokens", 2.0),
    ("max_tokens", U32_MAX + 1),
    ("logprobs", -1),
    ("logprobs", True),
    ("echo", "yes"),
    ("best_of", -1),
    ("seed", U64_MAX + 1),
    ("repetition_penalty", "1.5"),
]

OPENAI_FLOATS = ["temperature", "top_p", "frequency_penalty", "presence_penalty"]


@pytest.mark.parametrize(("name", "value"), CHAT_REFUSED)
async def test_chat_parameters_have_tgi_s_types(client: Any, name: str, value: Any) -> None:
    body = {"messages": HELLO, "max_tokens": 2, name: value}
    response = await client.post("/v1/chat/completions", json=body)
    assert_openai_parse_error(response, name)


@pytest.mark.parametrize(("name", "value"), COMPLETION_REFUSED)
async def test_completion_parameters_have_tgi_s_types(client: Any, name: str, value: Any) -> None:
    body = {"prompt": "hello", "max_tokens": 2, name: value}
    response = await client.post("/v1/completions", json=body)
    assert_openai_parse_error(response, name)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("name", OPENAI_FLOATS)
@pytest.mark.parametrize("value", NOT_FINITE)
async def test_openai_floats_must_be_finite_f32(
    client: Any, route: str, name: str, value: float
) -> None:
    body = {"messages": HELLO, "prompt": "hello", "max_tokens": 2, name: value}
    response = await client.post(route, **raw_json(body))
    assert_openai_parse_error(response, name)


@pytest.mark.parametrize(
    "parameters",
    [
        {"temperature": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0},
        {"temperature": 0, "seed": U64_MAX, "n": 1},
        {"logprobs": True, "top_logprobs": 2, "stream": False},
    ],
)
async def test_openai_values_tgi_s_types_hold_are_served(client: Any, parameters: dict) -> None:
    body = {"messages": HELLO, "max_tokens": 2} | parameters
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


async def test_invocations_parse_a_chat_with_the_same_types(client: Any) -> None:
    body = {"messages": HELLO, "max_tokens": 2, "presence_penalty": float("nan")}
    response = await client.post("/invocations", **raw_json(body))
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"
    assert "presence_penalty" in response.json()["error"]
