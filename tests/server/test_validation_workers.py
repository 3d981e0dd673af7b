"""CPU work of a request (tokenizing, templating) runs on the `--validation-workers`
threads, never on the event loop, so a big prompt cannot freeze streams or /health."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

HELLO = [{"role": "user", "content": "hello"}]
BIG_TEXT = "hello world " * 50_000  # 600 kB: seconds of tokenizing and rendering on 2 cores


class Gate:
    """Wraps callables so each call waits for `open()` (bounded), recording how many
    calls were inside at once and on which threads they ran."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.threads: list[int] = []
        self.peak = 0
        self._inside = 0
        self._lock = threading.Lock()

    def hold(self, func: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._inside += 1
                self.peak = max(self.peak, self._inside)
                self.threads.append(threading.get_ident())
            self.entered.release()
            self.opened.wait(timeout=5)  # on the loop (the bug) this blocks it, bounded
            with self._lock:
                self._inside -= 1
            return func(*args, **kwargs)

        return held

    async def wait_for_entries(self, count: int, timeout_s: float) -> bool:
        """Whether `count` more calls entered within `timeout_s` (waited for off the loop)."""
        loop = asyncio.get_running_loop()
        for _ in range(count):
            if not await loop.run_in_executor(None, self.entered.acquire, True, timeout_s):
                return False
        return True


class TokenizerProxy:
    """The served tokenizer with some of its methods replaced."""

    def __init__(self, tokenizer: Any, **methods: Callable[..., Any]) -> None:
        self._tokenizer = tokenizer
        self._methods = methods

    def __getattr__(self, name: str) -> Any:
        if name in self._methods:
            return self._methods[name]
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("__call__")(*args, **kwargs)


def hold_work(state: Any, route: str, gate: Gate) -> None:
    """Put `gate` in front of the CPU work `route` does for a request."""
    tokenizer = state.tokenizer
    if route in ("/generate", "/v1/completions"):
        state.validator.validate = gate.hold(state.validator.validate)
    elif route == "/tokenize":
        state.tokenizer = TokenizerProxy(tokenizer, __call__=gate.hold(tokenizer))
    else:  # the chat routes template first
        template = gate.hold(tokenizer.apply_chat_template)
        state.tokenizer = TokenizerProxy(tokenizer, apply_chat_template=template)


BODIES = {
    "/generate": {"inputs": "hello", "parameters": {"max_new_tokens": 2}},
    "/v1/completions": {"prompt": "hello", "max_tokens": 2},
    "/tokenize": {"inputs": "hello"},
    "/chat_tokenize": {"messages": HELLO},
    "/v1/chat/completions": {"messages": HELLO, "max_tokens": 2},
}


@pytest.mark.parametrize("workers", [1, 2])
async def test_validation_workers_size_the_pool(
    make_state: Any, serve_state: Any, workers: int
) -> None:
    state = make_state(validation_workers=workers)
    gate = Gate()
    hold_work(state, "/generate", gate)
    client = await serve_state(state)
    requests = [
        asyncio.ensure_future(client.post("/generate", json=BODIES["/generate"]))
        for _ in range(workers + 1)
    ]
    try:
        assert await gate.wait_for_entries(workers, timeout_s=10)
        # one request more than workers: it must wait for a free one (a bounded wait)
        assert not await gate.wait_for_entries(1, timeout_s=0.5)
    finally:
        gate.opened.set()
        responses = await asyncio.gather(*requests)
    assert [response.status_code for response in responses] == [200] * (workers + 1)
    assert gate.peak == workers


@pytest.mark.parametrize("route", list(BODIES))
async def test_every_route_s_cpu_work_runs_on_the_validation_workers(
    make_state: Any, serve_state: Any, route: str
) -> None:
    state = make_state(validation_workers=1)
    gate = Gate()
    hold_work(state, route, gate)
    client = await serve_state(state)
    requests = [asyncio.ensure_future(client.post(route, json=BODIES[route])) for _ in range(2)]
    try:
        assert await gate.wait_for_entries(1, timeout_s=10)
        assert not await gate.wait_for_entries(1, timeout_s=0.5)  # one worker, held
    finally:
        gate.opened.set()
        responses = await asyncio.gather(*requests)
    assert [response.status_code for response in responses] == [200, 200]
    assert gate.peak == 1
    assert threading.get_ident() not in gate.threads  # never on the event loop's thread


class Watched:
    """Calls through to `func`, telling the loop when the first call starts and noting
    the thread it runs on."""

    def __init__(self, func: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> None:
        self._func = func
        self._loop = loop
        self.started = asyncio.Event()
        self.threads: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.get_ident())
        self._loop.call_soon_threadsafe(self.started.set)
        return self._func(*args, **kwargs)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/tokenize", {"inputs": BIG_TEXT}),
        ("/chat_tokenize", {"messages": [{"role": "user", "content": BIG_TEXT}]}),
    ],
)
async def test_health_answers_while_a_big_prompt_is_tokenized(
    make_state: Any, serve_state: Any, route: str, body: dict[str, Any]
) -> None:
    state = make_state()
    watched = Watched(state.tokenizer, asyncio.get_running_loop())
    state.tokenizer = TokenizerProxy(state.tokenizer, __call__=watched)
    client = await serve_state(state)
    sent = time.perf_counter()
    big = asyncio.ensure_future(client.post(route, json=body))
    await asyncio.wait_for(watched.started.wait(), timeout=60)
    health = await client.get("/health")
    answered_s = time.perf_counter() - sent
    response = await big
    assert health.status_code == 200
    assert response.status_code == 200, response.text[:200]
    assert threading.get_ident() not in watched.threads
    # Tokenizing alone takes seconds; on the loop, /health waited for all of it. A
    # generous bound, for 2 shared cores: the worker still holds the GIL at times.
    assert answered_s < 2.0, f"/health took {answered_s:.2f} s"
    tokens = response.json()
    tokens = tokens if route == "/tokenize" else tokens["tokenize_response"]
    assert len(tokens) >= len(BIG_TEXT)  # the byte tokenizer: one token per byte at least
