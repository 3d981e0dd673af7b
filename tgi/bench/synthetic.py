"""A synthetic streaming server with known delays and injectable faults, to check the bench.

It speaks TGI's `/generate_stream` and OpenAI's streaming `/v1/completions` and
`/v1/chat/completions` on plain asyncio (HTTP/1.1, keep-alive, chunked bodies), so a
fault can be exactly what a real server does wrong: a 429, a connection closed before
or during a stream, an error event, a stream that stops without its final event.

Each generation request waits `ttft_s` before its first token and `itl_s` before each
next one, so a client should measure TTFT = ttft_s, ITL = TPOT = itl_s and latency =
ttft_s + (tokens - 1) * itl_s, plus loopback overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Fault", "SyntheticServer", "SyntheticSpec", "fault_cycle", "serve_in_thread"]

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 65536


class Fault(str, Enum):
    """What the server does to one generation request."""

    NONE = "none"  # a well-formed stream
    HTTP_429 = "http_429"  # 429 Too Many Requests with TGI's error body
    HTTP_500 = "http_500"
    DROP_BEFORE_RESPONSE = "drop_before_response"  # close without a status line
    DROP_MID_STREAM = "drop_mid_stream"  # close after half the tokens, chunk unfinished
    ERROR_EVENT = "error_event"  # an error event after half the tokens (TGI's 424 path)
    TRUNCATE = "truncate"  # end the body cleanly after half the tokens, no final event


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """Delays and faults; request n (counted from 0) gets `faults[n % len(faults)]`."""

    ttft_s: float = 0.05
    itl_s: float = 0.01
    default_tokens: int = 16  # when a request does not say how many
    faults: tuple[Fault, ...] = (Fault.NONE,)


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class SyntheticServer:
    """Serve `spec` on loopback; `faults_served` counts what each request got."""

    spec: SyntheticSpec = field(default_factory=SyntheticSpec)
    faults_served: Counter[Fault] = field(default_factory=Counter)
    _count: int = 0
    _server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; return the port (a free one when `port` is 0)."""
        self._server = await asyncio.start_server(self._connection, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # newer Pythons also wait for open keep-alive connections here; don't hang on them
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)

    def _next_fault(self) -> Fault:
        fault = self.spec.faults[self._count % len(self.spec.faults)]
        self._count += 1
        self.faults_served[fault] += 1
        return fault

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                if not await self._respond(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("synthetic connection ended: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        if request.method == "GET" and request.path == "/health":
            await _send_json(writer, 200, {})
            return True
        if request.method == "GET" and request.path == "/info":
            await _send_json(writer, 200, {"model_id": "synthetic", "version": "0"})
            return True
        routes = {
            "/generate_stream": "tgi",
            "/v1/completions": "openai",
            "/v1/chat/completions": "openai-chat",
        }
        if request.method != "POST" or request.path not in routes:
            await _send_json(writer, 404, {"error": "not found", "error_type": "not_found"})
            return True
        body = json.loads(request.body or b"{}")
        fault = self._next_fault()
        if fault is Fault.DROP_BEFORE_RESPONSE:
            return False
        if fault in (Fault.HTTP_429, Fault.HTTP_500):
            status = 429 if fault is Fault.HTTP_429 else 500
            await _send_json(
                writer, status, {"error": "Model is overloaded", "error_type": "overloaded"}
            )
            return True
        return await self._stream(writer, routes[request.path], body, fault)

    async def _stream(
        self, writer: asyncio.StreamWriter, api: str, body: dict[str, Any], fault: Fault
    ) -> bool:
        num_tokens = _requested_tokens(api, body, self.spec.default_tokens)
        events = _events(api, body, num_tokens)
        cut = max(1, num_tokens // 2)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        tokens_sent = 0
        for is_token, payload in events:
            if is_token:
                if fault is not Fault.NONE and tokens_sent == cut:
                    return await _fault_mid_stream(writer, fault)
                await asyncio.sleep(self.spec.ttft_s if tokens_sent == 0 else self.spec.itl_s)
                tokens_sent += 1
            await _send_chunk(writer, f"data: {payload}\n\n".encode())
        await _send_chunk(writer, b"")
        return True


async def _fault_mid_stream(writer: asyncio.StreamWriter, fault: Fault) -> bool:
    if fault is Fault.DROP_MID_STREAM:
        writer.write(b'40\r\ndata: {"tok')  # a chunk announced but never finished
        await writer.drain()
        return False
    if fault is Fault.ERROR_EVENT:
        error = {"error": "injected failure", "error_type": "generation"}
        await _send_chunk(writer, f"data: {json.dumps(error)}\n\n".encode())
    await _send_chunk(writer, b"")  # TRUNCATE and ERROR_EVENT end the body cleanly
    return True


def _requested_tokens(api: str, body: dict[str, Any], default: int) -> int:
    if api == "tgi":
        value = (body.get("parameters") or {}).get("max_new_tokens")
    else:
        value = body.get("max_tokens") or body.get("max_completion_tokens")
    return max(1, int(value)) if value else default


def _events(api: str, body: dict[str, Any], num_tokens: int) -> list[tuple[bool, str]]:
    """(is a token, data) for every event of one well-formed stream."""
    texts = [f" t{i}" for i in range(num_tokens)]
    if api == "tgi":
        details = bool((body.get("parameters") or {}).get("details"))
        out = []
        for i, text in enumerate(texts):
            last = i == num_tokens - 1
            event: dict[str, Any] = {
                "index": i + 1,
                "token": {"id": i, "text": text, "logprob": 0.0, "special": False},
                "top_tokens": [],
                "generated_text": "".join(texts) if last else None,
                "details": None,
            }
            if last and details:
                event["details"] = {
                    "finish_reason": "length",
                    "generated_tokens": num_tokens,
                    "input_length": 1,
                    "seed": None,
                }
            out.append((True, json.dumps(event)))
        return out
    chat = api == "openai-chat"
    out = []
    if chat:  # OpenAI servers open with a role-only delta before any token
        out.append((False, json.dumps(_chunk(chat, {"role": "assistant", "content": ""}, None))))
    for i, text in enumerate(texts):
        finish = "length" if i == num_tokens - 1 else None
        out.append(
            (True, json.dumps(_chunk(chat, text if not chat else {"content": text}, finish)))
        )
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {
            "prompt_tokens": 1,
            "completion_tokens": num_tokens,
            "total_tokens": num_tokens + 1,
        }
        out.append((False, json.dumps({"id": "synthetic", "choices": [], "usage": usage})))
    out.append((False, "[DONE]"))
    return out


def _chunk(chat: bool, content: Any, finish: str | None) -> dict[str, Any]:
    key = "delta" if chat else "text"
    return {
        "id": "synthetic",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "choices": [{"index": 0, key: content, "finish_reason": finish}],
    }


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed its keep-alive connection
    if len(head) > _MAX_HEADER_BYTES:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return _Request(method, path.split("?", 1)[0], headers, body)


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
    reasons = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
    data = json.dumps(payload).encode()
    writer.write(
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


@contextlib.contextmanager
def serve_in_thread(
    spec: SyntheticSpec, host: str = "127.0.0.1", port: int = 0
) -> Iterator[tuple[str, SyntheticServer]]:
    """Run a `SyntheticServer` on its own event loop in a thread; yield (base URL, server).

    Its own loop keeps the server's delays independent of the client's scheduling.
    """
    server = SyntheticServer(spec)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    bound: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        bound.append(loop.run_until_complete(server.start(host, port)))
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        loop.close()

    thread = threading.Thread(target=run, name="tgi-bench-synthetic", daemon=True)
    thread.start()
    if not ready.wait(timeout=10) or not bound:
        raise RuntimeError("the synthetic server did not start")
    try:
        yield f"http://{host}:{bound[0]}", server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def fault_cycle(names: Sequence[str]) -> tuple[Fault, ...]:
    """Faults from their names (`none,http_429,...`), for the CLI."""
    return tuple(Fault(name) for name in names) or (Fault.NONE,)
