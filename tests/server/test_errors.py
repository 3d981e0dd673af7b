"""Validation through HTTP: at and just past each edge, TGI's status, body and message."""

from __future__ import annotations

from typing import Any

import pytest

# Small limits make every edge reachable with short prompts ("hello" is 5 byte tokens).
LIMITS = {"max_total_tokens": 16, "max_input_tokens": 10, "max_stop_sequences": 4}

REJECTED = [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"temperature": -0.5}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"top_k": -1}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    (
        {"max_new_tokens": 12},
        "`inputs` tokens + `max_new_tokens` must be <= 16. "
        "Given: 5 `inputs` tokens and 12 `max_new_tokens`",
    ),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 10. Given: 0"),
    ({"truncate": 11}, "`truncate` must be strictly positive and less than 10. Given: 11"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
]

UNSUPPORTED = [
    ({"watermark": True}, "`watermark` is not supported by this server yet"),
    ({"best_of": 2, "do_sample": True}, "`best_of` is not supported by this server yet"),
    ({"top_n_tokens": 1}, "`top_n_tokens` is not supported by this server yet"),
    ({"typical_p": 0.5}, "`typical_p` is not supported by this server yet"),
    ({"repetition_penalty": 1.2}, "`repetition_penalty` is not supported by this server yet"),
    ({"frequency_penalty": 0.5}, "`frequency_penalty` is not supported by this server yet"),
    (
        {"grammar": {"type": "json", "value": {}}},
        "`grammar` is not supported by this server yet",
    ),
    (
        {"adapter_id": "my/lora"},
        "adapter `my/lora` not found: this server serves no LoRA adapters",
    ),
]

ACCEPTED = [
    {"temperature": 0.01},
    {"top_p": 0.99},
    {"top_p": 0.01},
    {"top_k": 1},
    {"max_new_tokens": 1},
    {"max_new_tokens": 11},  # 5 + 11 = max_total_tokens
    {"stop": ["a", "b", "c", "d"]},
    {"truncate": 1},
    {"truncate": 10},
    {"repetition_penalty": 1.0},  # neutral values are honoured, not refused
    {"frequency_penalty": 0.0},
    {"best_of": 1},
    {"top_n_tokens": 0},
]


@pytest.fixture
async def client(make_state: Any, serve_state: Any) -> Any:
    return await serve_state(make_state(**LIMITS))


def assert_validation_error(response: Any, message: str) -> None:
    assert response.status_code == 422, response.text
    assert response.json() == {"error": message, "error_type": "validation"}


@pytest.mark.parametrize(("parameters", "message"), REJECTED + UNSUPPORTED)
async def test_rejected_parameters(client: Any, parameters: dict, message: str) -> None:
    response = await client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    assert_validation_error(response, message)


@pytest.mark.parametrize("parameters", ACCEPTED)
async def test_accepted_parameters(client: Any, parameters: dict) -> None:
    parameters = {"max_new_tokens": 2} | parameters
    response = await client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["generated_text"], str)


async def test_empty_inputs(client: Any) -> None:
    response = await client.post("/generate", json={"inputs": "", "parameters": {}})
    assert_validation_error(response, "`inputs` cannot be empty")


async def test_input_length_edge(client: Any) -> None:
    at_limit = await client.post(
        "/generate", json={"inputs": "x" * 10, "parameters": {"max_new_tokens": 1}}
    )
    assert at_limit.status_code == 200, at_limit.text
    past = await client.post(
        "/generate", json={"inputs": "x" * 11, "parameters": {"max_new_tokens": 1}}
    )
    assert_validation_error(past, "`inputs` must have less than 10 tokens. Given: 11")


async def test_total_budget_is_checked_before_input_length(client: Any) -> None:
    # 12 tokens break both rules; TGI names the budget first.
    response = await client.post(
        "/generate", json={"inputs": "x" * 12, "parameters": {"max_new_tokens": 5}}
    )
    assert_validation_error(
        response,
        "`inputs` tokens + `max_new_tokens` must be <= 16. "
        "Given: 12 `inputs` tokens and 5 `max_new_tokens`",
    )


async def test_a_prompt_of_max_total_tokens_without_max_new_tokens(client: Any) -> None:
    # The default max_new_tokens is 0 then; TGI reports the input length, not the budget.
    response = await client.post("/generate", json={"inputs": "x" * 16, "parameters": {}})
    assert_validation_error(response, "`inputs` must have less than 10 tokens. Given: 16")


async def test_truncate_keeps_the_last_tokens(client: Any, byte_tokenizer: Any) -> None:
    response = await client.post(
        "/generate",
        json={
            "inputs": "abcdefghijklmnopqrst",  # 20 tokens, past max_input_tokens
            "parameters": {
                "truncate": 4,
                "max_new_tokens": 1,
                "details": True,
                "decoder_input_details": True,
            },
        },
    )
    assert response.status_code == 200, response.text
    prefill = response.json()["details"]["prefill"]
    assert [token["text"] for token in prefill] == ["q", "r", "s", "t"]


async def test_a_wrong_json_type_is_a_validation_error(client: Any) -> None:
    response = await client.post(
        "/generate", json={"inputs": "hello", "parameters": {"temperature": "hot"}}
    )
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == "validation"
    assert body["error"].startswith("parameters.temperature: ")


async def test_a_missing_inputs_field_is_a_validation_error(client: Any) -> None:
    response = await client.post("/generate", json={"parameters": {}})
    assert response.status_code == 422
    body = response.json()
    assert body["error_type"] == "validation"
    assert body["error"].startswith("inputs: ")


async def test_a_body_that_is_not_json_is_a_validation_error(client: Any) -> None:
    response = await client.post(
        "/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"


@pytest.mark.parametrize("route", ["/generate_stream", "/"])
async def test_other_generation_routes_validate_the_same_way(client: Any, route: str) -> None:
    body = {"inputs": "hello", "parameters": {"temperature": 0}, "stream": True}
    response = await client.post(route, json=body)
    assert_validation_error(response, "`temperature` must be strictly positive")
