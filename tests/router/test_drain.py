"""Shutting down gently (`Router.drain`): no new requests, the running ones finish, and
what cannot finish in time ends with an error event instead of a cut stream."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tgi.errors import BackendUnavailable
from tgi.router.request import ErrorEvent, FinalEvent
from tgi.testing.fake_backend import FakeBackend, expected_tokens
from tgi.testing.requests import collect, submit


async def test_a_drain_refuses_new_requests_and_lets_running_ones_finish(
    make_state: Any, byte_tokenizer: Any
) -> None:
    gate = threading.Event()  # no step runs before the drain has begun
    state = make_state(FakeBackend(vocab_size=len(byte_tokenizer), step_gate=gate))
    router = state.router
    router.start()
    try:
        running = submit(state, "running", max_new_tokens=20)
        queued = submit(state, "queued", max_new_tokens=5)
        drained = asyncio.ensure_future(router.drain(timeout_s=30))
        await asyncio.sleep(0)
        with pytest.raises(BackendUnavailable, match="shutting down"):
            submit(state, "late", max_new_tokens=2)
        with pytest.raises(BackendUnavailable):
            await router.check_health()
        gate.set()
        events = [await collect(running), await collect(queued)]
        assert await drained == 0
    finally:
        gate.set()
        await router.stop()
    vocab = len(byte_tokenizer)
    for prompt, n, got in (("running", 20, events[0]), ("queued", 5, events[1])):
        assert isinstance(got[-1], FinalEvent)
        assert [e.token.id for e in got] == expected_tokens(byte_tokenizer.encode(prompt), n, vocab)


async def test_what_does_not_finish_in_time_ends_with_an_error_event_and_frees_its_kv(
    make_state: Any, byte_tokenizer: Any
) -> None:
    gate = threading.Event()  # steps wait for it: the request cannot finish
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=gate)
    state = make_state(backend)
    router = state.router
    router.start()
    try:
        handle = submit(state, "slow", max_new_tokens=50)
        cut = await router.drain(timeout_s=0.2)
        events = await collect(handle)
        gate.set()
        for _ in range(1000):  # the release goes with the next plan
            if not backend.kv:
                break
            await asyncio.sleep(0.01)
    finally:
        gate.set()
        await router.stop()
    assert cut == 1
    last = events[-1]
    assert isinstance(last, ErrorEvent) and last.error_type == "unhealthy"
    assert "drain timeout" in last.message
    assert not backend.kv
