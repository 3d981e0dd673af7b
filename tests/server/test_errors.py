"""Validation through HTTP: at and just past each edge, TGI's status, body and message."""

from __future__ import annotations

import json
from typing import Any

import pytest

# Small limits make every edge reachable with short prompts ("hello" is 5 byte tokens).
JSON = {"content-type": "application/json"}
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
    (
        {"grammar": {"type": "regex", "value": "(("}},
        'grammar is not valid: invalid regex "((": unclosed group',
    ),
    (
        {"adapter_id": "my/lora"},
        "adapter `my/lora` not found: this server serves no LoRA adapters",
    ),
]

# Each range just past its edge (REJECTED has the rest).
PAST_THE_EDGE = [
    ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"repetition_penalty": -0.1}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"best_of": 0}, "`best_of` must be > 0 and <= 2. Given: 0"),
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
    {"repetition_penalty": 1.0},
    {"repetition_penalty": 0.01},
    {"frequency_penalty": 0.0},
    {"frequency_penalty": -2.0},
    {"frequency_penalty": 2.0},
    {"typical_p": 0.01},
    {"typical_p": 0.99},
    {"best_of": 1},
    {"best_of": 2, "do_sample": True},
    {"top_n_tokens": 0},
    {"top_n_tokens": 5},
    {"watermark": True},
    {"decoder_input_details": True},
]


@pytest.fixture
async def client(make_state: Any, serve_state: Any) -> Any:
    return await serve_state(make_state(**LIMITS))


def assert_validation_error(response: Any, message: str) -> None:
    assert response.status_code == 422, response.text
    # TGI's InferError display puts this prefix before every validation message.
    body = {"error": f"Input validation error: {message}", "error_type": "validation"}
    assert response.json() == body


@pytest.mark.parametrize(("parameters", "message"), REJECTED + UNSUPPORTED + PAST_THE_EDGE)
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


async def test_a_body_that_is_not_json_is_a_bad_request(client: Any, schemas: Any) -> None:
    # axum answers 400 to a body that is not JSON at all; tgi keeps TGI's body shape.
    response = await client.post(
        "/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    schemas.validate("ErrorResponse", response.json())
    assert response.json()["error_type"] == "validation"
    assert response.json()["error"].startswith("Failed to parse the request body as JSON: ")


@pytest.mark.parametrize("route", ["/generate_stream", "/"])
async def test_a_stream_reports_validation_errors_as_an_event(
    client: Any, route: str, schemas: Any
) -> None:
    # TGI's generate_stream answers 200 and sends the error inside the stream.
    body = {"inputs": "hello", "parameters": {"temperature": 0}, "stream": True}
    response = await client.post(route, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text == (
        'data: {"error":"Input validation error: `temperature` must be strictly positive",'
        '"error_type":"validation"}\n\n'
    )
    schemas.validate("ErrorResponse", json.loads(response.text.removeprefix("data: ")))


async def test_the_compat_route_without_stream_validates_like_generate(client: Any) -> None:
    response = await client.post("/", json={"inputs": "hello", "parameters": {"top_k": 0}})
    assert_validation_error(response, "`top_k` must be strictly positive")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"best_of": 2, "do_sample": True},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        # checked before anything else, even a broken temperature
        (
            {"decoder_input_details": True, "temperature": 0},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ],
)
async def test_what_a_stream_cannot_do(client: Any, parameters: dict, message: str) -> None:
    response = await client.post(
        "/generate_stream", json={"inputs": "hello", "parameters": parameters}
    )
    assert response.status_code == 200
    events = [
        json.loads(line.removeprefix("data:")) for line in response.text.split("\n\n") if line
    ]
    assert events == [{"error": f"Input validation error: {message}", "error_type": "validation"}]


async def test_validation_failures_are_counted(client: Any, make_state: Any) -> None:
    await client.post("/generate", json={"inputs": "hello", "parameters": {"top_k": 0}})
    await client.post("/generate_stream", json={"inputs": "hello", "parameters": {"top_k": 0}})
    metrics = await client.get("/metrics")
    assert 'tgi_request_failure{err="validation"} 2' in metrics.text
    assert "tgi_request_count 2" in metrics.text


# ---- the body limit -------------------------------------------------------------------


async def test_a_body_over_the_payload_limit_is_413(
    make_state: Any, serve_state: Any, schemas: Any
) -> None:
    client = await serve_state(make_state(payload_limit=200, **LIMITS))
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 1}}
    at_limit = json.dumps(body | {"pad": "x" * (200 - len(json.dumps(body)) - 11)}).encode()
    assert len(at_limit) == 200
    ok = await client.post("/generate", content=at_limit, headers=JSON)
    assert ok.status_code == 200, ok.text
    over = await client.post("/generate", content=at_limit[:-1] + b" }", headers=JSON)
    assert over.status_code == 413
    schemas.validate("ErrorResponse", over.json())
    assert over.json() == {
        "error": "Failed to buffer the request body: length limit exceeded",
        "error_type": "validation",
    }


async def test_a_body_over_the_limit_on_v1_gets_openai_s_error_shape(
    make_state: Any, serve_state: Any
) -> None:
    client = await serve_state(make_state(payload_limit=100, **LIMITS))
    body = {"model": "tgi", "messages": [{"role": "user", "content": "x" * 200}]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "message": "Failed to buffer the request body: length limit exceeded",
            "type": "validation",
            "param": None,
            "code": None,
        }
    }


async def test_a_chunked_body_over_the_limit_is_413(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(payload_limit=100, **LIMITS))

    async def chunks() -> Any:  # no Content-Length: the limit must count what arrives
        for _ in range(10):
            yield b" " * 20

    response = await client.post("/generate_stream", content=chunks(), headers=JSON)
    assert response.status_code == 413
