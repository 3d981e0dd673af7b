"""uvicorn's limits as flags, and the header read timeout (tgi.server.connections),
against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import pytest
import uvicorn

from tgi.config import resolve_config
from tgi.server.connections import HeaderTimeoutProtocol, uvicorn_options

Scope = MutableMapping[str, Any]


async def hello(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hi"})


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(**settings: Any) -> int:
        options = uvicorn_options(resolve_config({"hostname": "127.0.0.1", **settings}, {}))
        server = uvicorn.Server(uvicorn.Config(hello, **{**options, "port": 0}))
        task = asyncio.ensure_future(server.serve())
        servers.append((server, task))
        while not server.started:
            await asyncio.sleep(0.01)  # waiting for the bind, bounded by the test's timeout
        port: int = server.servers[0].sockets[0].getsockname()[1]
        return port

    yield start
    for server, task in servers:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


def test_flags_become_uvicorns_settings() -> None:
    config = resolve_config(
        {"keep_alive_timeout": 7, "max_connections": 300, "header_read_timeout": 2.5}, {}
    )
    options = uvicorn_options(config)
    assert options["timeout_keep_alive"] == 7
    assert options["limit_concurrency"] == 300
    assert issubclass(options["http"], HeaderTimeoutProtocol)
    assert options["http"].header_timeout_s == 2.5
    defaults = uvicorn_options(resolve_config({}, {}))
    assert (defaults["timeout_keep_alive"], defaults["limit_concurrency"]) == (5, None)
    assert defaults["http"].header_timeout_s == 10.0


def test_environment_names() -> None:
    config = resolve_config(
        {},
        {
            "TGI_KEEP_ALIVE_TIMEOUT": "9",
            "TGI_MAX_CONNECTIONS": "64",
            "TGI_HEADER_READ_TIMEOUT": "0.5",
        },
    )
    assert (config.keep_alive_timeout, config.max_connections, config.header_read_timeout) == (
        9,
        64,
        0.5,
    )


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n"])
async def test_a_connection_without_a_request_head_is_closed(serve: Any, sent: bytes) -> None:
    port = await serve(header_read_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(sent)
    await writer.drain()
    # today uvicorn holds it open for ever: the read below would time out
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()


async def test_a_later_request_that_stalls_is_closed_too(serve: Any) -> None:
    port = await serve(header_read_timeout=0.2, keep_alive_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"hi"), timeout=5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"GET / HTTP/1.1\r\nHo")  # then nothing more
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()


async def test_a_prompt_request_is_served_and_kept_alive(serve: Any) -> None:
    port = await serve(header_read_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # the second request on the same connection
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"hi"), timeout=5)
        assert head.startswith(b"HTTP/1.1 200")
    writer.close()


def test_non_positive_limits_are_refused() -> None:
    from tgi.errors import ConfigError

    for var in ("TGI_KEEP_ALIVE_TIMEOUT", "TGI_MAX_CONNECTIONS", "TGI_HEADER_READ_TIMEOUT"):
        with pytest.raises(ConfigError, match=var):
            resolve_config({}, {var: "0"})
