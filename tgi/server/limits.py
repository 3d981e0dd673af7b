"""The request body limit (`--payload-limit`), as pure ASGI middleware.

NOTE: the body is read, and counted, before the app sees it: a declared
`Content-Length` over the limit is refused without reading, a chunked body as soon as
it crosses the limit. The app then gets the buffered body, and every later `receive`
(a streamed response watching for the client leaving) goes to the real channel.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tgi.server.errors import payload_too_large, shaped_error

__all__ = ["PayloadLimit"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class PayloadLimit:
    """Answers 413 to bodies over `limit_bytes`: in TGI's error shape, or in OpenAI's on
    the /v1 routes (whose clients parse that one; this runs before any route is chosen)."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self._app = app
        self._limit = limit_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self._app(scope, receive, send)
            return
        if _declared_length(scope) > self._limit:
            await _too_large(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                await _too_large(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)


def _declared_length(scope: MutableMapping[str, Any]) -> int:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _too_large(scope: MutableMapping[str, Any], send: Send) -> None:
    status, body = payload_too_large()
    shaped = shaped_error(str(scope.get("path", "")), body["error"], body["error_type"])
    payload = json.dumps(shaped).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
