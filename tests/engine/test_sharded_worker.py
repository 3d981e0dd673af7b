"""`--num-shard 2` for real: a tiny llama split over two engine worker processes (gloo),
served through the router; a rank killed mid-stream, a model that does not split."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tgi.config import ServeConfig, resolve_config, snapshot_environ
from tgi.engine.worker.client import WorkerEngine
from tgi.errors import ConfigError
from tgi.launcher import build_state, prepare
from tgi.router.request import ErrorEvent, Event, FinalEvent, TokenEvent
from tgi.server.state import ServerState
from tgi.testing.requests import collect, submit
from tgi.testing.tiny_models import build_tiny_model

PROMPTS = ("hello world", "a second, longer prompt of some words", "x")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # one KV head for two shards: it is replicated on both
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", num_kv_heads=1, seed=1)


def configure(model_dir: Path, **values: Any) -> ServeConfig:
    environ = snapshot_environ()
    environ["TGI_BACKENDS"] = "cpu"
    return resolve_config(
        {
            "model_id": str(model_dir),
            "dtype": "float32",
            "max_total_tokens": 96,
            "kv_cache_memory": 4 * 2**20,
            "cache_dir": str(model_dir / "cache"),
            "cpu_threads": 1,
            **values,
        },
        environ,
    )


@pytest.fixture
def serve(model_dir: Path) -> Iterator[Any]:
    states: list[ServerState] = []

    def factory(**values: Any) -> ServerState:
        state = build_state(prepare(configure(model_dir, **values)))
        states.append(state)
        return state

    yield factory
    for state in states:
        state.router.engine.close()


def token_ids(events: list[Event]) -> list[int]:
    return [e.token.id for e in events if isinstance(e, TokenEvent | FinalEvent)]


async def generate_all(state: ServerState, max_new_tokens: int = 12) -> list[list[int]]:
    handles = [submit(state, p, max_new_tokens=max_new_tokens) for p in PROMPTS]
    return [
        token_ids(events)
        for events in await asyncio.gather(*(collect(h.events()) for h in handles))
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_shards_serve_the_tokens_of_one_and_stop_with_the_server(serve: Any) -> None:
    one, two = serve(), serve(num_shard=2)
    engine = two.router.engine
    assert isinstance(engine, WorkerEngine) and len(engine.rank_pids) == 2
    results = []
    for state in (one, two):
        state.router.start()
        try:
            results.append(await generate_all(state))
        finally:
            await state.router.stop()
    assert results[0] == results[1]
    assert all(len(tokens) == 12 for tokens in results[1])
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in engine.rank_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in engine.rank_pids), "a rank outlived stop()"


async def test_rank_1_killed_mid_stream_gives_503s_and_every_rank_restarts(serve: Any) -> None:
    state = serve(num_shard=2, max_batch_size=1)
    router = state.router
    engine = router.engine
    assert isinstance(engine, WorkerEngine)
    router.start()
    try:
        want = await generate_all(state)
        before = engine.rank_pids
        running = submit(state, PROMPTS[0], max_new_tokens=80)
        stream = running.events()
        assert isinstance(await stream.__anext__(), TokenEvent)
        os.kill(before[1], signal.SIGKILL)
        started = time.monotonic()
        failed = await collect(stream)
        noticed = time.monotonic() - started
        again = await generate_all(state)
    finally:
        await router.stop()
    last = failed[-1]
    assert isinstance(last, ErrorEvent) and last.error_type == "unhealthy"
    assert "rank 1" in last.message and "SIGKILL" in last.message
    assert noticed < 5
    assert again == want
    assert router.restarts == 1
    assert not set(engine.rank_pids) & set(before)
    assert not _alive(before[0]), "rank 0 of the dead set was left running"


def test_a_shard_count_the_model_does_not_divide_is_refused_before_loading(
    model_dir: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"4 attention heads % 3 shards"):
        prepare(configure(model_dir, num_shard=3))


def test_shards_need_engine_workers(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--no-engine-process"):
        prepare(configure(model_dir, num_shard=2, engine_process=False))
