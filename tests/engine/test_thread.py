"""Every backend call, warmup included, runs on the one engine thread."""

from __future__ import annotations

import threading
from typing import Any

from tgi.backend.contract import Limits, StepOutput, StepPlan, WarmupReport
from tgi.engine.thread import EngineThread
from tgi.testing.fake_backend import FakeBackend


class ThreadRecordingBackend(FakeBackend):
    """A FakeBackend that notes which thread each call came from."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threads: dict[str, set[int]] = {}

    def _note(self, method: str) -> None:
        self.threads.setdefault(method, set()).add(threading.get_ident())

    def warmup(self, limits: Limits) -> WarmupReport:
        self._note("warmup")
        return super().warmup(limits)

    def step(self, plan: StepPlan) -> StepOutput:
        self._note("step")
        return super().step(plan)


async def test_call_and_run_share_one_thread_that_is_not_the_callers() -> None:
    engine = EngineThread()
    try:
        started = engine.call(threading.get_ident)
        stepped = await engine.run(threading.get_ident)
    finally:
        engine.shutdown()
    assert started == stepped != threading.get_ident()


async def test_warmup_and_steps_run_on_the_engine_thread(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    backend = ThreadRecordingBackend(vocab_size=len(byte_tokenizer))
    client = await serve_state(make_state(backend))
    response = await client.post(
        "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}
    )
    assert response.status_code == 200
    assert set(backend.threads) == {"warmup", "step"}
    (thread,) = set().union(*backend.threads.values())
    assert thread != threading.get_ident()
