"""Who may call, from where, and what each call left behind: `--api-key`, CORS, the
`x-request-id` of every response, the access log line and the request's trace.

NOTE: pure ASGI middleware, outermost first (Starlette runs the last one added first):

    RequestContext  request id in and out, access line, root span, a 500 it must answer
    CORSMiddleware  (with --cors-allow-origin) answers preflights, before any key check:
                    browsers never send Authorization on a preflight
    ApiKeyAuth      (with --api-key) 401 unless `Authorization: Bearer <key>`
    PayloadLimit    (tgi.server.limits) 413 past --payload-limit

so a 401 or 413 still gets its request id and CORS headers. The generation routes
report what only they know (tokens, queue and inference time) through `note_final` and
`note_validation`: the record they write to lives in a context variable, which the
tasks a route starts (a stream's body, its event readers) share by reference.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.middleware.cors import CORSMiddleware

from tgi.config import ServeConfig
from tgi.logs import ACCESS_LOGGER, REQUEST_ID
from tgi.server.errors import shaped_error

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tgi.router.request import FinalEvent
    from tgi.server.tracing import Tracing

__all__ = [
    "ApiKeyAuth",
    "RequestContext",
    "RequestRecord",
    "install_access",
    "note_final",
    "note_validation",
    "request_id_of",
]

access_logger = logging.getLogger(ACCESS_LOGGER)

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is kept when it is short, printable and safe in a log line or header.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# what browsers may read cross-origin: the id and TGI's timing headers
_EXPOSED_HEADERS = (
    "x-request-id",
    "x-compute-type",
    "x-compute-time",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-prompt-tokens",
    "x-generated-tokens",
)


@dataclass(slots=True)
class RequestRecord:
    """What the access line and the trace say about one HTTP request."""

    request_id: str
    started: float  # perf_counter at arrival
    span: Any = None  # the root span when tracing, else None
    prompt_tokens: int | None = None  # summed over the request's sequences
    generated_tokens: int | None = None
    validation_s: float | None = None
    queue_s: list[float] = field(default_factory=list)  # one per sequence
    inference_s: list[float] = field(default_factory=list)


_RECORD: ContextVar[RequestRecord | None] = ContextVar("tgi_request_record", default=None)
_TRACING: ContextVar[Tracing | None] = ContextVar("tgi_tracing", default=None)


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `x-request-id` when it is sane, else a new one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _CLIENT_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def note_validation(duration_s: float) -> None:
    """A route's request was validated in `duration_s` (a `validate` span when tracing)."""
    record = _RECORD.get()
    if record is None:
        return
    record.validation_s = (record.validation_s or 0.0) + duration_s
    tracing = _TRACING.get()
    if tracing is not None and record.span is not None:
        end_ns = time.time_ns()
        tracing.record_phase(record.span, "validate", end_ns - int(duration_s * 1e9), end_ns)


def note_final(event: FinalEvent) -> None:
    """One of the request's sequences ended: count its tokens, trace its router time."""
    record = _RECORD.get()
    if record is None:
        return
    record.generated_tokens = (record.generated_tokens or 0) + event.generated_tokens
    record.prompt_tokens = (record.prompt_tokens or 0) + event.input_length
    record.queue_s.append(event.queued_s)
    record.inference_s.append(event.inference_s)
    tracing = _TRACING.get()
    if tracing is not None and record.span is not None:
        tracing.record_generation(record.span, event.queued_s, event.inference_s)


class RequestContext:
    """Gives every HTTP response an `x-request-id`, logs one access line per request
    (never the prompt: ids, route, status, token counts, durations) and, with tracing,
    wraps the request in its root span."""

    def __init__(self, app: ASGIApp, tracing: Tracing | None = None) -> None:
        self._app = app
        self._tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        record = RequestRecord(request_id_of(scope["headers"]), time.perf_counter())
        if self._tracing is not None:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            record.span = self._tracing.start_request(scope["method"], scope["path"], headers)
        tokens = (
            _RECORD.set(record),
            _TRACING.set(self._tracing),
            REQUEST_ID.set(record.request_id),
        )
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((REQUEST_ID_HEADER, record.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        except Exception:
            if not started:  # what Starlette would answer, with the id on it
                await _send_json(
                    send_with_id,
                    500,
                    shaped_error(scope["path"], "Internal Server Error", "internal"),
                )
            raise
        finally:
            self._finish(scope, record, status)
            _RECORD.reset(tokens[0])
            _TRACING.reset(tokens[1])
            REQUEST_ID.reset(tokens[2])

    def _finish(self, scope: Scope, record: RequestRecord, status: int) -> None:
        route = getattr(scope.get("route"), "path", None) or scope["path"]
        if self._tracing is not None and record.span is not None:
            self._tracing.end_request(record.span, route, status, record.request_id)
        if not access_logger.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "method": scope["method"],
            "route": route,
            "status": status,
            "duration_ms": round((time.perf_counter() - record.started) * 1000, 3),
        }
        if record.generated_tokens is not None:
            fields["prompt_tokens"] = record.prompt_tokens
            fields["generated_tokens"] = record.generated_tokens
            fields["queue_ms"] = round(max(record.queue_s) * 1000, 3)
            fields["inference_ms"] = round(max(record.inference_s) * 1000, 3)
        if record.validation_s is not None:
            fields["validation_ms"] = round(record.validation_s * 1000, 3)
        access_logger.info("%s %s %d", scope["method"], route, status, extra={"access": fields})


class ApiKeyAuth:
    """TGI's `--api-key`: 401 unless the request carries `Authorization: Bearer <key>`.

    The key is compared in constant time (`hmac.compare_digest`: a compare that stops at
    the first wrong byte tells a timing attacker how many were right). The scheme is
    matched case-insensitively (RFC 9110), the key exactly; TGI lower-cases both. Paths
    in `exempt` (probes, the scraper) are served without a key; the 401 body is the
    route family's error shape (TGI's axum answers an empty body)."""

    def __init__(self, app: ASGIApp, api_key: str, exempt: tuple[str, ...] = ()) -> None:
        self._app = app
        self._key = api_key.encode()
        self._exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt or self._authorized(scope):
            await self._app(scope, receive, send)
            return
        body = shaped_error(scope["path"], "Unauthorized", "unauthorized")
        await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


async def _send_json(
    send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    all_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def install_access(app: FastAPI, config: ServeConfig, tracing: Tracing | None) -> None:
    """Add the middleware above around what `app` has so far (call it last)."""
    if config.api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key, exempt=config.api_key_exempt)
    if config.cors_allow_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_allow_origin),
            allow_credentials=config.cors_allow_credentials,
            allow_methods=list(config.cors_allow_methods),
            allow_headers=list(config.cors_allow_headers),
            expose_headers=list(_EXPOSED_HEADERS),
        )
    app.add_middleware(RequestContext, tracing=tracing)
