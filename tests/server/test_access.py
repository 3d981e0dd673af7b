"""--api-key, CORS, x-request-id and the JSON access line (tgi.server.access)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from tgi.config import resolve_config
from tgi.logs import _JsonFormatter

PROMPT = "the secret prompt"
GENERATE = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# ---- --api-key ---------------------------------------------------------------------


async def test_generate_without_the_key_is_401_in_tgi_shape(
    make_state: Any, serve_state: Any
) -> None:
    client = await serve_state(make_state(api_key="s3cret"))
    response = await client.post("/generate", json=GENERATE)
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized", "error_type": "unauthorized"}
    assert response.headers["www-authenticate"] == "Bearer"


async def test_v1_without_the_key_is_401_in_openai_shape(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(api_key="s3cret"))
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    assert response.json() == {
        "error": {"message": "Unauthorized", "type": "unauthorized", "param": None, "code": None}
    }


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer"],
)
async def test_a_wrong_key_or_scheme_is_401(
    make_state: Any, serve_state: Any, authorization: str
) -> None:
    client = await serve_state(make_state(api_key="s3cret"))
    response = await client.post(
        "/generate", json=GENERATE, headers={"Authorization": authorization}
    )
    assert response.status_code == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_key_lets_requests_through(
    make_state: Any, serve_state: Any, scheme: str
) -> None:
    client = await serve_state(make_state(api_key="s3cret"))
    headers = {"Authorization": f"{scheme} s3cret"}
    assert (await client.post("/generate", json=GENERATE, headers=headers)).status_code == 200
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    ).status_code == 200
    assert (await client.get("/info", headers=headers)).status_code == 200


async def test_probes_and_metrics_stay_open_by_default(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(api_key="s3cret"))
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    assert (await client.get("/info")).status_code == 401


async def test_exempt_paths_are_configurable(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(api_key="s3cret", api_key_exempt="/health"))
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 401


async def test_without_a_key_nothing_is_checked(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    assert (await client.post("/generate", json=GENERATE)).status_code == 200


def test_the_key_comes_from_api_key_and_is_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = resolve_config({}, {"API_KEY": "s3cret"})
    assert config.api_key == "s3cret"
    assert config.source_of("api_key") == "env API_KEY"
    with caplog.at_level(logging.INFO, logger="tgi.config"):
        config.log_summary()
    assert "api_key = '***' (env API_KEY)" in caplog.text
    assert "s3cret" not in caplog.text


# ---- CORS --------------------------------------------------------------------------

PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,authorization",
}


async def test_preflight_from_an_allowed_origin_is_answered(
    make_state: Any, serve_state: Any
) -> None:
    # the key is set too: a preflight never carries it, and must not need it
    state = make_state(cors_allow_origin="https://app.example,https://other.example", api_key="k")
    client = await serve_state(state)
    response = await client.options("/generate", headers=PREFLIGHT)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert set(response.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    assert "authorization" in response.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in response.headers


async def test_preflight_from_another_origin_is_refused(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(cors_allow_origin="https://app.example"))
    response = await client.options(
        "/generate", headers={**PREFLIGHT, "Origin": "https://evil.example"}
    )
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


async def test_cors_headers_on_answers_and_on_401s(make_state: Any, serve_state: Any) -> None:
    state = make_state(cors_allow_origin="*", api_key="k", cors_allow_credentials=True)
    client = await serve_state(state)
    origin = {"Origin": "https://app.example"}
    refused = await client.post("/generate", json=GENERATE, headers=origin)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    assert refused.headers["access-control-allow-credentials"] == "true"
    served = await client.post(
        "/generate", json=GENERATE, headers={**origin, "Authorization": "Bearer k"}
    )
    assert served.status_code == 200
    assert "x-request-id" in served.headers["access-control-expose-headers"]


async def test_without_cors_settings_options_is_still_405(
    make_state: Any, serve_state: Any
) -> None:
    client = await serve_state(make_state())
    response = await client.options("/generate", headers=PREFLIGHT)
    assert response.status_code == 405
    assert "access-control-allow-origin" not in response.headers


def test_cors_origins_from_the_environment() -> None:
    config = resolve_config({}, {"CORS_ALLOW_ORIGIN": "https://a.example, https://b.example"})
    assert config.cors_allow_origin == ("https://a.example", "https://b.example")


# ---- x-request-id ------------------------------------------------------------------


async def test_a_sane_client_request_id_is_returned(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    response = await client.post("/generate", json=GENERATE, headers={"x-request-id": "req-42.a:b"})
    assert response.headers["x-request-id"] == "req-42.a:b"


@pytest.mark.parametrize("sent", ["x" * 129, "has space", "semi;colon", "é"])
async def test_an_insane_request_id_is_replaced(
    make_state: Any, serve_state: Any, sent: str
) -> None:
    client = await serve_state(make_state())
    response = await client.get("/health", headers={"x-request-id": sent.encode()})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


async def test_every_response_gets_its_own_id(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state(api_key="k", payload_limit=100))
    answers = [
        await client.get("/health"),
        await client.get("/nowhere", headers={"Authorization": "Bearer k"}),
        await client.post("/generate", json=GENERATE),  # 401
        await client.post(
            "/generate", json={"inputs": "x" * 200}, headers={"Authorization": "Bearer k"}
        ),
        await client.post("/generate_stream", json=GENERATE, headers={"Authorization": "Bearer k"}),
    ]
    assert [answer.status_code for answer in answers] == [200, 404, 401, 413, 200]
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert len(set(ids)) == len(ids)


# ---- the access line ---------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = _JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "tgi.access"
    ]


async def test_one_access_line_per_request_without_the_prompt(
    make_state: Any, serve_state: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve_state(make_state())
    with caplog.at_level(logging.INFO, logger="tgi.access"):
        plain = await client.post("/generate", json=GENERATE, headers={"x-request-id": "one"})
        streamed = await client.post(
            "/generate_stream", json=GENERATE, headers={"x-request-id": "two"}
        )
        refused = await client.post(
            "/generate", json={"inputs": "", "parameters": {"max_new_tokens": 3}}
        )
    assert (plain.status_code, streamed.status_code, refused.status_code) == (200, 200, 422)
    lines = access_lines(caplog)
    assert [line["request_id"] for line in lines[:2]] == ["one", "two"]
    assert len(lines) == 3
    for line in lines[:2]:
        assert line["target"] == "tgi.access"
        assert line["method"] == "POST"
        assert line["status"] == 200
        assert line["generated_tokens"] == 3
        assert line["prompt_tokens"] == len(PROMPT.encode())  # a byte tokenizer
        for timing in ("duration_ms", "validation_ms", "queue_ms", "inference_ms"):
            assert line[timing] >= 0
    assert [line["route"] for line in lines] == ["/generate", "/generate_stream", "/generate"]
    assert lines[2]["status"] == 422
    assert "generated_tokens" not in lines[2]
    assert PROMPT not in caplog.text
    assert all(PROMPT not in json.dumps(line) for line in lines)


async def test_the_access_line_names_the_route_not_the_path(
    make_state: Any, serve_state: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve_state(make_state())
    with caplog.at_level(logging.INFO, logger="tgi.access"):
        await client.get("/health")
        await client.get("/no/such/thing")
    assert [(line["route"], line["status"]) for line in access_lines(caplog)] == [
        ("/health", 200),
        ("/no/such/thing", 404),
    ]


def test_a_repeated_cors_flag_and_comma_lists_combine() -> None:
    config = resolve_config(
        {"cors_allow_origin": ["https://a.example", "https://b, https://c"]}, {}
    )
    assert config.cors_allow_origin == ("https://a.example", "https://b", "https://c")
    assert resolve_config({"api_key_exempt": ""}, {}).api_key_exempt == ()
