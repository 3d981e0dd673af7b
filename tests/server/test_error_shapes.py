"""Every error answer is JSON in its route family's shape: TGI's `{error, error_type}`, or
OpenAI's `{"error": {...}}` under /v1 (what the openai SDK parses), whatever failed:
a tool definition, a body that is not UTF-8 or too deep to parse, a wrong method, an
unknown path, an exception nothing expected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tgi.server.app import create_app

HELLO = [{"role": "user", "content": "hello"}]
JSON = {"content-type": "application/json"}
NOT_UTF8 = b'{"inputs": "\xff\xfe", "prompt": "\xff\xfe", "messages": []}'
TOO_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
async def client(make_state: Any, serve_state: Any) -> Any:
    return await serve_state(make_state())


@pytest.fixture
async def lenient_client(make_state: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """A client that gets the app's 500 answer instead of the exception behind it (the
    app still raises it afterwards, for the server's log)."""
    state = make_state()
    app = create_app(state)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://tgi", timeout=60)
    try:
        yield state, client
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


def tgi_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "error_type"}, body
    return body


def openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# ---- tools whose schema is not one ---------------------------------------------------

BROKEN_TOOLS = [
    ({"type": "object", "properties": [1]}, "`parameters.properties` must be an object"),
    ({"type": "object", "properties": "city"}, "`parameters.properties` must be an object"),
    ({"type": "object", "required": "city"}, "`parameters.required` must be an array of names"),
    ({"type": "object", "required": [1]}, "`parameters.required` must be an array of names"),
]


def chat_with_tool(parameters: dict[str, Any]) -> dict[str, Any]:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    return {"messages": HELLO, "tools": [tool], "max_tokens": 2}


@pytest.mark.parametrize(("parameters", "message"), BROKEN_TOOLS)
async def test_a_broken_tool_is_a_tool_error_on_v1(
    client: Any, parameters: dict[str, Any], message: str
) -> None:
    response = await client.post("/v1/chat/completions", json=chat_with_tool(parameters))
    error = openai_error(response, 422)
    assert error["type"] == "tool_error"
    assert error["message"] == f"Tool error: tool `get_weather`: {message}"


@pytest.mark.parametrize("route", ["/chat_tokenize", "/invocations"])
@pytest.mark.parametrize(("parameters", "message"), BROKEN_TOOLS)
async def test_a_broken_tool_is_a_tool_error_on_tgi_s_routes(
    client: Any, route: str, parameters: dict[str, Any], message: str
) -> None:
    response = await client.post(route, json=chat_with_tool(parameters))
    assert tgi_error(response, 422) == {
        "error": f"Tool error: tool `get_weather`: {message}",
        "error_type": "tool_error",
    }


# ---- bodies JSON cannot be read from -------------------------------------------------

TGI_ROUTES = ["/generate", "/generate_stream", "/", "/tokenize", "/chat_tokenize", "/invocations"]
OPENAI_ROUTES = ["/v1/chat/completions", "/v1/completions"]
UNREADABLE = [(NOT_UTF8, "utf-8"), (TOO_DEEP, "recursion")]  # (body, what the error names)


@pytest.mark.parametrize(("body", "reason"), UNREADABLE, ids=["not-utf8", "too-deep"])
@pytest.mark.parametrize("route", TGI_ROUTES)
async def test_an_unreadable_body_is_a_bad_request_on_tgi_s_routes(
    client: Any, route: str, body: bytes, reason: str
) -> None:
    # axum answers 400 to a body serde cannot parse; the body is TGI's error shape
    error = tgi_error(await client.post(route, content=body, headers=JSON), 400)
    assert error["error_type"] == "validation"
    assert error["error"].startswith("Failed to parse the request body as JSON: ")
    assert reason in error["error"]


@pytest.mark.parametrize(("body", "reason"), UNREADABLE, ids=["not-utf8", "too-deep"])
@pytest.mark.parametrize("route", OPENAI_ROUTES)
async def test_an_unreadable_body_is_a_bad_request_on_v1(
    client: Any, route: str, body: bytes, reason: str
) -> None:
    error = openai_error(await client.post(route, content=body, headers=JSON), 400)
    assert error["type"] == "validation"
    assert error["message"].startswith("Failed to parse the request body as JSON: ")
    assert reason in error["message"]


# ---- routing -------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/generate", "/tokenize", "/invocations"])
async def test_a_wrong_method_is_405_in_tgi_s_shape(client: Any, route: str) -> None:
    response = await client.get(route)
    assert tgi_error(response, 405) == {
        "error": "Method Not Allowed",
        "error_type": "method_not_allowed",
    }
    assert response.headers["allow"] == "POST"


async def test_a_wrong_method_is_405_in_openai_s_shape(client: Any) -> None:
    response = await client.get("/v1/chat/completions")
    error = openai_error(response, 405)
    assert (error["message"], error["type"]) == ("Method Not Allowed", "method_not_allowed")
    assert response.headers["allow"] == "POST"


async def test_an_unknown_path_is_404_in_its_family_s_shape(client: Any) -> None:
    assert tgi_error(await client.get("/nowhere"), 404) == {
        "error": "Not Found",
        "error_type": "not_found",
    }
    error = openai_error(await client.post("/v1/embeddings", json={}), 404)
    assert (error["message"], error["type"]) == ("Not Found", "not_found")


# ---- what nothing expected -----------------------------------------------------------


def explode(*_: Any, **__: Any) -> Any:
    raise RuntimeError("a bug, say")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate", {"inputs": "hello"}),
        ("/", {"inputs": "hello"}),
        ("/invocations", {"inputs": "hello"}),
        ("/chat_tokenize", {"messages": HELLO}),
    ],
)
async def test_an_unhandled_exception_is_a_json_500_in_tgi_s_shape(
    lenient_client: Any, monkeypatch: pytest.MonkeyPatch, route: str, body: dict[str, Any]
) -> None:
    state, client = lenient_client
    monkeypatch.setattr(state.validator, "validate", explode)
    monkeypatch.setattr(state, "tokenizer", _ExplodingTokenizer(state.tokenizer))
    response = await client.post(route, json=body)
    assert tgi_error(response, 500) == {"error": "Internal Server Error", "error_type": "internal"}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"messages": HELLO}),
        ("/v1/completions", {"prompt": "hello"}),
    ],
)
async def test_an_unhandled_exception_is_a_json_500_in_openai_s_shape(
    lenient_client: Any, monkeypatch: pytest.MonkeyPatch, route: str, body: dict[str, Any]
) -> None:
    state, client = lenient_client
    monkeypatch.setattr(state.validator, "validate", explode)
    error = openai_error(await client.post(route, json=body), 500)
    assert (error["message"], error["type"]) == ("Internal Server Error", "internal")


class _ExplodingTokenizer:
    """The served tokenizer, except that tokenizing raises."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        explode()


# ---- /health -------------------------------------------------------------------------


async def test_health_is_an_empty_200_as_tgi_documents_it(client: Any, openapi: Any) -> None:
    response = await client.get("/health")
    assert (response.status_code, response.content) == (200, b"")
    assert "content-type" not in response.headers
    # TGI's document declares no body for the 200; ours says the same
    ours = (await client.get("/openapi.json")).json()["paths"]["/health"]["get"]["responses"]
    assert "content" not in openapi["paths"]["/health"]["get"]["responses"]["200"]
    assert "content" not in ours["200"]
