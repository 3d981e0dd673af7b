"""The records the benchmark passes between its parts: requests out, outcomes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Api", "BenchRequest", "FailureKind", "RequestOutcome"]


class Api(str, Enum):
    """The streaming protocol a server speaks."""

    TGI = "tgi"
    OPENAI = "openai"
    OPENAI_CHAT = "openai-chat"

    @property
    def default_endpoint(self) -> str:
        return {
            Api.TGI: "/generate_stream",
            Api.OPENAI: "/v1/completions",
            Api.OPENAI_CHAT: "/v1/chat/completions",
        }[self]


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One prompt to send, with the lengths the metrics count against."""

    prompt: str  # text sent as-is (TGI `inputs`, OpenAI `prompt` or the user message)
    prompt_len: int  # tokens of `prompt` under the benchmark's tokenizer
    output_len: int  # max_new_tokens / max_tokens asked for


class FailureKind(str, Enum):
    """Why a request failed; `RequestOutcome.failure_key` names it in result tables."""

    HTTP = "http"  # a status other than 200 (the key appends it: "http_429")
    CONNECTION = "connection"  # refused, reset, or closed mid-stream
    TIMEOUT = "timeout"  # no byte for `timeout_s`
    SERVER_ERROR = "server_error"  # an error event inside a 200 stream
    INCOMPLETE = "incomplete"  # the stream ended without its final event
    NO_TOKENS = "no_tokens"  # the stream finished without a single token
    INVALID = "invalid"  # a body that is not the protocol's JSON


@dataclass(slots=True)
class RequestOutcome:
    """What one request did, timed on the client with `time.perf_counter()`.

    NOTE: timings are relative to the moment the request was sent (`ttft_s`,
    `latency_s`) or to the start of its level (`start_s`). A token event is one
    streamed event that carries generated text; `itl_s` holds the gaps between
    consecutive token events, so it has one entry fewer than there were events.
    """

    index: int  # position of the request in its level's dataset
    prompt_len: int  # from the dataset
    output_len: int  # asked for
    start_s: float = 0.0  # when it was sent, seconds after the level started
    success: bool = False
    # the server's count when it gives one, else token events; failed: events before it
    output_tokens: int = 0
    ttft_s: float | None = None  # time to the first token event
    latency_s: float | None = None  # time to the last token event (end-to-end)
    itl_s: list[float] = field(default_factory=list)  # gaps between token events
    failure: FailureKind | None = None  # None when it succeeded
    error: str | None = None  # the message, for people
    status_code: int | None = None  # the HTTP status, when one came back

    @property
    def failure_key(self) -> str | None:
        """`http_429`, `connection`, ...: how failures are grouped and reported."""
        if self.failure is FailureKind.HTTP:
            return f"http_{self.status_code}"
        return None if self.failure is None else self.failure.value
