"""The router when its engine dies: 503s for what was in flight, a restart, the queue
served again, and a bounded number of restarts (no worker process: `DyingEngine` raises
`EngineDied` as a dead worker's client does; tests/engine/test_worker.py kills real ones)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from tgi.backend.contract import KVUsage, Limits, StepPlan, WarmupReport
from tgi.engine.local import LocalEngine
from tgi.engine.protocol import EngineDescription, EngineDied, EngineStats
from tgi.engine.results import StepResult
from tgi.errors import BackendError, BackendUnavailable
from tgi.router.request import ErrorEvent, FinalEvent, TokenEvent
from tgi.testing.fake_backend import FakeBackend, expected_tokens
from tgi.testing.requests import collect, submit


class DyingEngine:
    """A `LocalEngine` over a `FakeBackend` that dies when told to; `restart` builds a
    fresh backend (the old one's KV is gone, as a dead worker's is)."""

    def __init__(self, vocab_size: int, *, gate: threading.Event | None = None) -> None:
        self.vocab_size = vocab_size
        self.gate = gate
        self.die = threading.Event()  # the next step raises EngineDied
        self.die_at_step: int | None = None  # ... or the step of this many runs
        self.steps = 0
        self.gone: str | None = None  # what `exited` says (a worker dead while idle)
        self.fail_restarts = 0  # restarts that raise before one succeeds
        self.restarts = 0
        self.limits: Limits | None = None
        self.engine = self._fresh()

    def _fresh(self) -> LocalEngine:
        return LocalEngine(FakeBackend(vocab_size=self.vocab_size, step_gate=self.gate))

    @property
    def backend(self) -> FakeBackend:
        backend = self.engine.backend
        assert isinstance(backend, FakeBackend)
        return backend

    @property
    def description(self) -> EngineDescription:
        return self.engine.description

    def warmup(self, limits: Limits) -> WarmupReport:
        self.limits = limits
        return self.engine.warmup(limits)

    def submit(self, plan: StepPlan) -> None:
        self.steps += 1
        if self.die.is_set() or self.steps == self.die_at_step:
            self.die.clear()
            raise EngineDied("the engine worker pid 1 ended with SIGKILL")
        self.engine.submit(plan)

    def collect(self) -> StepResult:
        return self.engine.collect()

    def release(self, seq_ids: Sequence[int]) -> KVUsage:
        return self.engine.release(seq_ids)

    def kv_usage(self) -> KVUsage:
        return self.engine.kv_usage()

    def health(self) -> None:
        self.engine.health()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def exited(self) -> str | None:
        return self.gone

    def restart(self) -> WarmupReport:
        self.gone = None
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise BackendError("the restarted worker failed to load")
        assert self.limits is not None
        self.engine = self._fresh()
        self.restarts += 1
        return self.engine.warmup(self.limits)

    def close(self) -> None:
        pass


async def first_token(stream: Any) -> TokenEvent:
    event = await asyncio.wait_for(stream.__anext__(), timeout=30)
    assert isinstance(event, TokenEvent), event
    return event


async def test_a_dead_engine_fails_running_requests_with_503_and_serves_the_queue(
    byte_tokenizer: Any, make_engine_state: Any
) -> None:
    vocab = len(byte_tokenizer)
    gate = threading.Event()
    engine = DyingEngine(vocab, gate=gate)
    # one running row at a time: the second request waits in the queue
    state = make_engine_state(engine, max_batch_size=1)
    router = state.router
    router.start()
    try:
        running = submit(state, "running", max_new_tokens=30)
        queued = submit(state, "queued", max_new_tokens=5)
        stream = running.events()
        gate.set()
        await first_token(stream)
        engine.die.set()
        rest = await collect(stream)
        queued_events = await collect(queued)
        after = await collect(submit(state, "after", max_new_tokens=4))
        for _ in range(1000):  # the last release lands with the next plan
            if not router.stats().kv.seq_ids:
                break
            await asyncio.sleep(0.01)
    finally:
        gate.set()
        await router.stop()
    failure = rest[-1]
    assert isinstance(failure, ErrorEvent)
    assert failure.error_type == "unhealthy"
    assert "SIGKILL" in failure.message
    assert isinstance(queued_events[-1], FinalEvent)
    assert [e.token.id for e in queued_events] == expected_tokens(
        byte_tokenizer.encode("queued"), 5, vocab
    )
    assert [e.token.id for e in after] == expected_tokens(byte_tokenizer.encode("after"), 4, vocab)
    assert engine.restarts == router.restarts == 1
    assert router.healthy and router.fatal is None
    # the fresh backend never heard of the failed request; nothing leaked on either side
    assert not engine.backend.kv and not router.stats().kv.seq_ids
    assert router.stats().batch_size == 0
    assert state.metrics.engine_restarts._value.get() == 1
    assert state.metrics.request_failure.labels(err="unhealthy")._value.get() == 1


async def test_the_health_route_is_503_while_the_engine_restarts(
    byte_tokenizer: Any, serve_state: Any, make_engine_state: Any
) -> None:
    gate = threading.Event()
    engine = DyingEngine(len(byte_tokenizer), gate=gate)
    state = make_engine_state(engine)
    client = await serve_state(state)
    restarted = threading.Event()
    proceed = threading.Event()
    original_restart = engine.restart

    def slow_restart() -> WarmupReport:
        restarted.set()
        proceed.wait(timeout=30)
        return original_restart()

    engine.restart = slow_restart  # type: ignore[method-assign]
    engine.die.set()
    gate.set()
    response = await client.post("/generate", json={"inputs": "x", "parameters": {}})
    assert response.status_code == 503
    assert response.json()["error_type"] == "unhealthy"
    await asyncio.get_running_loop().run_in_executor(None, restarted.wait, 30)
    assert (await client.get("/health")).status_code == 503
    info = (await client.get("/info")).json()
    assert info["engine"]["healthy"] is False
    proceed.set()
    for _ in range(300):
        if (await client.get("/health")).status_code == 200:
            break
        await asyncio.sleep(0.02)
    assert (await client.get("/health")).status_code == 200
    response = await client.post(
        "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}
    )
    assert response.status_code == 200
    assert (await client.get("/info")).json()["engine"]["restarts"] == 1


async def test_a_streamed_request_gets_the_503_body_as_its_last_event(
    byte_tokenizer: Any, serve_state: Any, make_engine_state: Any
) -> None:
    engine = DyingEngine(len(byte_tokenizer))
    engine.die_at_step = 3  # after two tokens
    client = await serve_state(make_engine_state(engine))
    response = await client.post(
        "/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 30}}
    )
    assert response.status_code == 200
    lines = [line for line in response.text.splitlines() if line.startswith("data:")]
    assert len(lines) == 3
    assert '"error_type":"unhealthy"' in lines[-1]


async def test_an_engine_that_keeps_dying_stops_the_router(
    byte_tokenizer: Any, make_engine_state: Any
) -> None:
    gate = threading.Event()
    engine = DyingEngine(len(byte_tokenizer), gate=gate)
    engine.fail_restarts = 5  # every restart fails: the budget runs out
    state = make_engine_state(engine, max_engine_restarts=2, max_batch_size=1)
    router = state.router
    reasons: list[str] = []
    router.on_fatal = reasons.append
    router.start()
    try:
        running = submit(state, "running", max_new_tokens=30)
        queued = submit(state, "queued", max_new_tokens=5)
        gate.set()
        stream = running.events()
        await first_token(stream)
        engine.die.set()
        assert isinstance((await collect(stream))[-1], ErrorEvent)
        queued_last = (await collect(queued))[-1]
        with pytest.raises(BackendUnavailable, match="2 restarts"):
            submit(state, "late", max_new_tokens=2)
        with pytest.raises(BackendUnavailable):
            await router.check_health()
    finally:
        await router.stop()
    assert isinstance(queued_last, ErrorEvent) and queued_last.error_type == "unhealthy"
    assert engine.fail_restarts == 3  # two restarts tried, then no more
    assert len(reasons) == 1 and "--max-engine-restarts 2" in reasons[0]
    assert router.fatal == reasons[0]
    assert not router.healthy


async def test_a_failed_restart_is_retried_within_the_budget(
    byte_tokenizer: Any, make_engine_state: Any
) -> None:
    gate = threading.Event()
    engine = DyingEngine(len(byte_tokenizer), gate=gate)
    engine.fail_restarts = 1
    state = make_engine_state(engine, max_engine_restarts=2)
    router = state.router
    router.start()
    try:
        gate.set()
        engine.die.set()
        failed = await collect(submit(state, "dies", max_new_tokens=3))
        events = await collect(submit(state, "served", max_new_tokens=3))
    finally:
        await router.stop()
    assert isinstance(failed[-1], ErrorEvent)
    assert isinstance(events[-1], FinalEvent)
    assert engine.restarts == 1 and router.restarts == 1 and router.fatal is None


async def test_an_engine_that_dies_while_idle_is_restarted_before_the_next_request(
    byte_tokenizer: Any, make_engine_state: Any
) -> None:
    engine = DyingEngine(len(byte_tokenizer))
    state = make_engine_state(engine)
    router = state.router
    router.start()
    try:
        await collect(submit(state, "before", max_new_tokens=2))
        engine.gone = "the engine worker pid 1 ended with SIGKILL"
        for _ in range(500):  # the idle loop looks every WATCH_S
            if router.restarts:
                break
            await asyncio.sleep(0.01)
        events = await collect(submit(state, "after", max_new_tokens=3))
    finally:
        await router.stop()
    assert router.restarts == engine.restarts == 1 and router.healthy
    assert [e.token.id for e in events] == expected_tokens(
        byte_tokenizer.encode("after"), 3, len(byte_tokenizer)
    )


async def test_an_engine_that_dies_during_a_drain_is_not_restarted(
    byte_tokenizer: Any, make_engine_state: Any
) -> None:
    gate = threading.Event()
    engine = DyingEngine(len(byte_tokenizer), gate=gate)
    state = make_engine_state(engine, max_batch_size=1)
    router = state.router
    router.start()
    try:
        running = submit(state, "running", max_new_tokens=30)
        queued = submit(state, "queued", max_new_tokens=5)
        stream = running.events()
        gate.set()
        await first_token(stream)
        drained = asyncio.ensure_future(router.drain(timeout_s=30))
        await asyncio.sleep(0)
        engine.die.set()
        failed = [(await collect(stream))[-1], (await collect(queued))[-1]]
        assert await drained == 0
    finally:
        await router.stop()
    assert all(isinstance(e, ErrorEvent) and e.error_type == "unhealthy" for e in failed)
    assert engine.restarts == 0 and router.restarts == 0 and not router.healthy


async def test_a_router_loop_that_raises_fails_its_requests_instead_of_hanging(
    byte_tokenizer: Any, make_state: Any
) -> None:
    class Broken:
        """A policy that breaks on its first schedule (a bug, say)."""

        def __init__(self, policy: Any) -> None:
            self._policy = policy

        def schedule(self, *args: Any) -> Any:
            raise RuntimeError("policy bug")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._policy, name)

    def broken_policy(config: Any, capabilities: Any, limits: Any, report: Any) -> Any:
        from tgi.router.policies import ContinuousPolicy

        return Broken(ContinuousPolicy.from_capabilities(capabilities, limits))

    state = make_state(custom_policy=broken_policy)
    router = state.router
    router.start()
    try:
        events = await collect(submit(state, "x", max_new_tokens=3))
        with pytest.raises(BackendUnavailable, match="policy bug"):
            submit(state, "y", max_new_tokens=3)
    finally:
        await router.stop()
    assert isinstance(events[-1], ErrorEvent) and events[-1].error_type == "unhealthy"
    assert router.fatal is not None and "router loop failed" in router.fatal
