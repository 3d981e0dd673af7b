"""One streamed request, timed token event by token event, for each protocol the bench speaks.

Protocols (`Api`):

- `tgi`: TGI's `POST /generate_stream`; every `data:` event carries one token, the last
  one `generated_text` (and `details.generated_tokens` when asked), errors come as
  `{"error", "error_type"}` events;
- `openai`: `POST /v1/completions` with `stream: true`; chunks carry `choices[0].text`,
  usage (when the server honours `stream_options.include_usage`) and end with `[DONE]`;
- `openai-chat`: `POST /v1/chat/completions`, the same with `choices[0].delta.content`.

A request never raises: whatever goes wrong becomes a `RequestOutcome` with a
`FailureKind`, so one broken connection cannot stop a run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tgi.bench.records import Api, BenchRequest, FailureKind, RequestOutcome

__all__ = ["Api", "EventInfo", "StreamClient", "fetch_server_info", "parse_event", "wait_ready"]

logger = logging.getLogger(__name__)

_ERROR_BODY_CHARS = 300


@dataclass(frozen=True, slots=True)
class EventInfo:
    """What one streamed JSON event says, whatever the protocol."""

    token: bool = False  # it carries generated output: a token event for the timings
    text: str = ""  # the generated text it carries
    finished: bool = False  # the generation ended (TGI's last event, OpenAI finish_reason)
    output_tokens: int | None = None  # the server's own count of generated tokens
    error: str | None = None  # an error reported inside the stream


def _parse_tgi(data: dict[str, Any]) -> EventInfo:
    if "error" in data:
        return EventInfo(error=f"{data.get('error_type', 'error')}: {data['error']}")
    details = data.get("details") or {}
    token = data.get("token")
    return EventInfo(
        token=isinstance(token, dict),
        text=str(token.get("text", "")) if isinstance(token, dict) else "",
        finished=data.get("generated_text") is not None,
        output_tokens=details.get("generated_tokens") if isinstance(details, dict) else None,
    )


def _parse_openai(data: dict[str, Any], *, chat: bool) -> EventInfo:
    if "error" in data:
        error = data["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        return EventInfo(error=str(message))
    usage = data.get("usage")
    count = usage.get("completion_tokens") if isinstance(usage, dict) else None
    choices = data.get("choices") or []
    if not choices:
        return EventInfo(output_tokens=count)
    choice = choices[0]
    finish = choice.get("finish_reason")
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text is None:
            text = delta.get("reasoning_content") or delta.get("reasoning")
        # the role-only opening delta and an empty closing one are not tokens
        token = text is not None and (text != "" or (finish is None and "role" not in delta))
    else:
        text = choice.get("text")
        token = text is not None and (text != "" or finish is None)
    return EventInfo(token=token, text=text or "", finished=finish is not None, output_tokens=count)


def parse_event(api: Api, data: dict[str, Any]) -> EventInfo:
    """Read one `data:` JSON event of protocol `api`."""
    if api is Api.TGI:
        return _parse_tgi(data)
    return _parse_openai(data, chat=api is Api.OPENAI_CHAT)


class _Timer:
    """Token event times of one request, relative to its send time."""

    __slots__ = ("events", "itl_s", "last", "sent", "ttft_s")

    def __init__(self) -> None:
        self.sent = time.perf_counter()
        self.last: float | None = None
        self.ttft_s: float | None = None
        self.itl_s: list[float] = []
        self.events = 0

    def token(self, now: float) -> None:
        if self.last is None:
            self.ttft_s = now - self.sent
        else:
            self.itl_s.append(now - self.last)
        self.last = now
        self.events += 1


class StreamClient:
    """Sends `BenchRequest`s to one server and times their streams.

    `count_tokens` counts the tokens of generated text when the server reports no count
    (an OpenAI server without `include_usage`); without it, token events are counted.
    """

    def __init__(
        self,
        base_url: str,
        api: Api,
        *,
        endpoint: str | None = None,
        model: str | None = None,
        ignore_eos: bool = True,
        extra_body: dict[str, Any] | None = None,
        timeout_s: float = 600.0,
        count_tokens: Callable[[str], int] | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.api = api
        self.url = base_url.rstrip("/") + (endpoint or api.default_endpoint)
        self.model = model
        self.ignore_eos = ignore_eos
        self.extra_body = dict(extra_body or {})
        self.count_tokens = count_tokens
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def payload(self, request: BenchRequest) -> dict[str, Any]:
        """The JSON body for `request`: greedy, `output_len` tokens, EOS ignored if asked."""
        if self.api is Api.TGI:
            parameters: dict[str, Any] = {
                "max_new_tokens": request.output_len,
                "do_sample": False,
                "details": True,
            }
            if self.ignore_eos:
                parameters["ignore_eos"] = True  # vLLM's extension; tgi honours it
            parameters.update(self.extra_body)
            return {"inputs": request.prompt, "parameters": parameters}
        body: dict[str, Any] = {
            "max_tokens": request.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model is not None:
            body["model"] = self.model
        if self.api is Api.OPENAI_CHAT:
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    async def send(
        self, request: BenchRequest, *, index: int = 0, level_start: float | None = None
    ) -> RequestOutcome:
        """Send one request and time its stream; never raises for a failed request."""
        outcome = RequestOutcome(index, request.prompt_len, request.output_len)
        timer = _Timer()
        if level_start is not None:
            outcome.start_s = timer.sent - level_start
        try:
            await self._stream(request, outcome, timer)
        except httpx.TimeoutException as exc:
            _fail(outcome, FailureKind.TIMEOUT, f"{type(exc).__name__}: {exc}")
        except httpx.TransportError as exc:
            _fail(outcome, FailureKind.CONNECTION, f"{type(exc).__name__}: {exc}")
        if outcome.failure is not None:
            outcome.output_tokens = timer.events  # what arrived before it failed
            outcome.error = f"{outcome.error} (after {timer.events} tokens)"
            logger.debug("request %d failed: %s", index, outcome.error)
        return outcome

    async def _stream(self, request: BenchRequest, outcome: RequestOutcome, timer: _Timer) -> None:
        finished, server_count, texts = False, None, []
        async with self._http.stream("POST", self.url, json=self.payload(request)) as response:
            outcome.status_code = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:_ERROR_BODY_CHARS]
                _fail(outcome, FailureKind.HTTP, f"HTTP {response.status_code}: {body}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                raw = line[5:].strip()
                if raw == "[DONE]":
                    finished = True
                    break
                now = time.perf_counter()
                try:
                    data = json.loads(raw)
                except ValueError:
                    _fail(outcome, FailureKind.INVALID, f"not JSON: {raw[:_ERROR_BODY_CHARS]}")
                    return
                info = parse_event(self.api, data) if isinstance(data, dict) else EventInfo()
                if info.error is not None:
                    _fail(outcome, FailureKind.SERVER_ERROR, info.error)
                    return
                if info.token:
                    timer.token(now)
                    texts.append(info.text)
                finished = finished or info.finished
                server_count = info.output_tokens if info.output_tokens else server_count
        self._finish(outcome, timer, finished, server_count, "".join(texts))

    def _finish(
        self,
        outcome: RequestOutcome,
        timer: _Timer,
        finished: bool,
        server_count: int | None,
        text: str,
    ) -> None:
        if not finished:
            _fail(outcome, FailureKind.INCOMPLETE, "the stream ended before its final event")
            return
        if timer.events == 0 or timer.last is None:
            _fail(outcome, FailureKind.NO_TOKENS, "the stream finished without a token")
            return
        if server_count is not None:
            outcome.output_tokens = server_count
        elif self.api is not Api.TGI and self.count_tokens is not None:
            outcome.output_tokens = self.count_tokens(text)
        else:
            outcome.output_tokens = timer.events  # TGI streams exactly one token per event
        outcome.success = True
        outcome.ttft_s = timer.ttft_s
        outcome.latency_s = timer.last - timer.sent
        outcome.itl_s = timer.itl_s


def _fail(outcome: RequestOutcome, kind: FailureKind, message: str) -> None:
    outcome.success = False
    outcome.failure = kind
    outcome.error = message


async def wait_ready(base_url: str, timeout_s: float, *, path: str = "/health") -> bool:
    """Poll `path` until it answers 200 or `timeout_s` passes; True when ready."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(base_url.rstrip("/") + path)).status_code == 200:
                    return True
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.5)
    return False


async def fetch_server_info(base_url: str, api: Api) -> dict[str, Any]:
    """What the server says about itself (`/info`, `/v1/models`), for the result file."""
    paths = ("/info", "/v1/models") if api is Api.TGI else ("/v1/models", "/info", "/props")
    info: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=10.0) as http:
        for path in paths:
            try:
                response = await http.get(base_url.rstrip("/") + path)
            except httpx.TransportError as exc:
                logger.debug("GET %s failed: %s", path, exc)
                continue
            if response.status_code == 200:
                try:
                    info[path] = response.json()
                except ValueError:
                    continue
    return info
