"""Soak: random client disconnects and overload against the fake paged backend, with the
real router, sampler and HTTP app.

More clients than `--max-concurrent-requests` send a seeded random mix of requests
(plain and streamed; completed, or left mid-stream, or left before the answer). After
the storm: no KV block, block-table entry or engine state is left, every client that
stayed got its whole answer or a documented error (429 `overloaded`), the server is
healthy, and greedy text is what it was before the storm. About 15-30 s on two busy
CPU cores.

Requests go straight to the ASGI app (`call_app`), so a client can leave at any point:
after some SSE chunks, or while it waits for a plain answer (the app's `receive`
then returns `http.disconnect`, as uvicorn does). The random pauses before leaving
only spread the disconnects over a request's life; no assertion depends on them.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from tgi.server.app import create_app
from tgi.testing.fake_backend import FakePagedBackend
from tgi.testing.paged import check_drained

pytestmark = pytest.mark.once  # see pyproject.toml

SEED = 17
NUM_CLIENTS = 24  # concurrent clients ...
MAX_CONCURRENT = 16  # ... against this many requests the server admits: the rest get 429
REQUESTS_PER_CLIENT = 150
PROMPTS = [
    ("the quick brown fox", 24),
    ("jumps over", 40),
    ("a lazy dog and then some more words to make a longer prompt", 16),
    ("soak", 56),
    ("0123456789", 32),
]  # (inputs, max_new_tokens)
APP_DEADLINE_S = 30.0  # a request the app has not finished by then is lost


@dataclass
class Outcome:
    """What one client saw."""

    status: int | None = None
    chunks: list[bytes] = field(default_factory=list)
    left: bool = False  # the client went away before the end

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def call_app(
    app: Any,
    path: str,
    body: dict[str, Any],
    *,
    leave_after_chunks: int | None = None,
    leave_after_s: float | None = None,
) -> Outcome:
    """One POST through the ASGI interface; the client leaves after that many body
    chunks, or after that many seconds, if given. Returns when the app has returned."""
    outcome = Outcome()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode()}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            raise OSError("client disconnected")  # what uvicorn raises then
        if message["type"] == "http.response.start":
            outcome.status = message["status"]
        elif message["type"] == "http.response.body" and message.get("body"):
            outcome.chunks.append(message["body"])
            if leave_after_chunks is not None and len(outcome.chunks) >= leave_after_chunks:
                outcome.left = True
                gone.set()

    def leave() -> None:
        if outcome.status is None:  # it has its answer already: nothing to leave
            outcome.left = True
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"tgi")],
        "client": ("127.0.0.1", 1234),
        "server": ("tgi", 80),
    }
    timer = None
    if leave_after_s is not None:
        timer = asyncio.get_running_loop().call_later(leave_after_s, leave)
    try:
        await asyncio.wait_for(app(scope, receive, send), timeout=APP_DEADLINE_S)
    except OSError:
        assert outcome.left, "the app failed to send to a client that was still there"
    finally:
        if timer is not None:
            timer.cancel()
    return outcome


def last_event(path: str, outcome: Outcome) -> dict[str, Any]:
    """The answer's JSON: the plain body, or a stream's last SSE event."""
    if path == "/generate":
        return dict(json.loads(outcome.body))
    events = [line[5:] for line in outcome.body.decode().splitlines() if line.startswith("data:")]
    return dict(json.loads(events[-1]))


def final_text(path: str, outcome: Outcome) -> str:
    """The generated text of a completed answer."""
    last = last_event(path, outcome)
    assert "error" not in last, last
    return str(last["generated_text"])


async def client(app: Any, rng: random.Random, seen: list[tuple[str, int, Outcome]]) -> None:
    for _ in range(REQUESTS_PER_CLIENT):
        index = rng.randrange(len(PROMPTS))
        inputs, max_new_tokens = PROMPTS[index]
        body = {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens}}
        kind = rng.random()
        if kind < 0.35:
            path, outcome = "/generate", await call_app(app, "/generate", body)
        elif kind < 0.6:
            path, outcome = "/generate_stream", await call_app(app, "/generate_stream", body)
        elif kind < 0.85:
            chunks = rng.randint(1, 6)
            path = "/generate_stream"
            outcome = await call_app(app, path, body, leave_after_chunks=chunks)
        else:
            delay_s = rng.uniform(0.0, 0.05)
            path = "/generate"
            outcome = await call_app(app, path, body, leave_after_s=delay_s)
        seen.append((path, index, outcome))
        if outcome.status == 429 or b"overloaded" in outcome.body[:200]:
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # a client backs off a little


async def settle(state: Any, backend: FakePagedBackend) -> None:
    """Wait (bounded) until the router holds nothing and the backend no KV."""
    for _ in range(1_000):
        stats = state.router.stats()
        if not (stats.queue_size or stats.batch_size or backend.kv_usage().seq_ids):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never settled: {state.router.stats()}, {backend.kv_usage()}")


async def test_a_storm_of_disconnects_and_overload_leaks_and_loses_nothing(
    make_state: Any, byte_tokenizer: Any
) -> None:
    backend = FakePagedBackend(len(byte_tokenizer), num_blocks=96, block_size=4)
    state = make_state(backend, max_total_tokens=128, max_concurrent_requests=MAX_CONCURRENT)
    app = create_app(state)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        before = []
        for inputs, max_new_tokens in PROMPTS:
            body = {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens}}
            answer = await call_app(app, "/generate", body)
            assert answer.status == 200
            before.append(final_text("/generate", answer))

        seen: list[tuple[str, int, Outcome]] = []
        rng = random.Random(SEED)
        clients = [client(app, random.Random(rng.random()), seen) for _ in range(NUM_CLIENTS)]
        await asyncio.gather(*clients)
        await settle(state, backend)

        counts: Counter[str] = Counter()
        for path, index, outcome in seen:
            if outcome.left:
                counts["left"] += 1
                continue
            assert outcome.status in (200, 429), (path, outcome.status, outcome.body[:300])
            last = last_event(path, outcome)
            if "error" in last:  # a 429, or a stream's only event (TGI's 200 SSE error)
                assert last["error_type"] == "overloaded", last
                assert outcome.status == 429 or path == "/generate_stream", outcome.status
                counts["overloaded"] += 1
                continue
            assert final_text(path, outcome) == before[index], (path, PROMPTS[index])
            counts["completed"] += 1
        assert counts["left"] >= 50 and counts["overloaded"] >= 20, counts
        assert sum(counts.values()) == NUM_CLIENTS * REQUESTS_PER_CLIENT

        # nothing leaked: backend KV, the policy's blocks and tables, the engine's state
        assert not backend.kv_usage().seq_ids and not backend.tables
        check_drained(state.router.policy)
        stats = await state.router.engine_stats()
        assert (stats.num_tracked, stats.num_histories, stats.num_matchers) == (0, 0, 0)

        # still healthy, and greedy text unchanged after the storm
        await state.router.check_health()
        assert state.router.healthy
        for (inputs, max_new_tokens), text in zip(PROMPTS, before, strict=True):
            body = {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens}}
            after = await call_app(app, "/generate", body)
            assert after.status == 200 and final_text("/generate", after) == text
    finally:
        await lifespan.__aexit__(None, None, None)
