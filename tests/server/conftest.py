"""HTTP-test fixtures: OpenAPI schema checks, a streaming ASGI client, paced backend steps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import httpx
import pytest

from tgi.server.app import create_app
from tgi.server.state import ServerState
from tgi.testing.openapi import OpenApiSchemas


@pytest.fixture(scope="session")
def schemas(openapi: dict[str, Any]) -> OpenApiSchemas:
    return OpenApiSchemas(openapi)


class _QueueStream(httpx.AsyncByteStream):
    """The body of a streamed ASGI response; closing it early tells the app the client left."""

    def __init__(
        self,
        chunks: asyncio.Queue[bytes | None],
        gone: asyncio.Event,
        app_task: asyncio.Task[None],
        app_errors: list[BaseException],
    ) -> None:
        self._chunks = chunks
        self._gone = gone
        self._app_task = app_task
        self._app_errors = app_errors
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk
        self._complete = True

    async def aclose(self) -> None:
        left_early = not self._complete
        self._gone.set()
        await asyncio.wait_for(self._app_task, timeout=30)
        # After a client leaves, the app failing to send is expected; before, it is a bug.
        if self._app_errors and not left_early:
            raise self._app_errors[0]


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Like httpx.ASGITransport, but hands body chunks over as the app sends them.

    httpx's own transport buffers the whole body before returning, so a client can
    never leave mid-stream through it; this one sends `http.disconnect` on close.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        gone = asyncio.Event()
        started: asyncio.Future[MutableMapping[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if gone.is_set():
                raise OSError("client disconnected")
            if message["type"] == "http.response.start":
                started.set_result(message)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(key.lower(), value) for key, value in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }

        app_errors: list[BaseException] = []

        async def run_app() -> None:
            try:
                await self._app(scope, receive, send)
            except Exception as exc:
                if not started.done():
                    started.set_exception(exc)
                app_errors.append(exc)
            finally:
                chunks.put_nowait(None)

        app_task = asyncio.get_running_loop().create_task(run_app())
        start = await started
        return httpx.Response(
            start["status"],
            headers=start.get("headers", []),
            stream=_QueueStream(chunks, gone, app_task, app_errors),
        )


@pytest.fixture
async def stream_client() -> AsyncIterator[Callable[[ServerState], Any]]:
    """Like `serve_state`, through a transport where closing a stream disconnects."""
    started: list[tuple[httpx.AsyncClient, Any]] = []

    async def start(state: ServerState) -> httpx.AsyncClient:
        app = create_app(state)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=StreamingASGITransport(app), base_url="http://tgi", timeout=60
        )
        started.append((client, lifespan))
        return client

    yield start
    for client, lifespan in started:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


class StepPermits:
    """A FakeBackend `step_gate` that lets a counted number of backend calls through."""

    def __init__(self, permits: int) -> None:
        self._semaphore = threading.Semaphore(permits)

    def wait(self, timeout: float | None = None) -> bool:
        return self._semaphore.acquire(timeout=timeout)

    def grant(self, permits: int) -> None:
        self._semaphore.release(permits)


@pytest.fixture
def step_permits() -> type[StepPermits]:
    return StepPermits
