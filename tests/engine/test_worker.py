"""The engine in a worker process, for real: a tiny llama on the CPU backend served
through `WorkerEngine`, killed, stopped and restarted (tests/router/test_recovery.py
covers the router's side with an engine that only pretends to die); the same split over
two ranks (`--num-shard 2`, two worker processes over gloo)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tgi.backend.contract import NewSequence, RunningSequence, StepPlan
from tgi.config import ServeConfig, resolve_config, snapshot_environ
from tgi.engine.protocol import EngineDied
from tgi.engine.worker.client import WorkerEngine
from tgi.engine.worker.messages import StartWorker
from tgi.errors import ConfigError
from tgi.launcher import Prepared, build_state, prepare, worker_start
from tgi.router.request import ErrorEvent, Event, FinalEvent, TokenEvent
from tgi.server.state import ServerState
from tgi.testing.requests import collect, submit
from tgi.testing.tiny_models import build_tiny_model

PROMPTS = ("hello world", "a second, longer prompt of some words", "x")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def configure(model_dir: Path, **values: Any) -> ServeConfig:
    environ = snapshot_environ()
    environ["TGI_BACKENDS"] = "cpu"
    return resolve_config(
        {
            "model_id": str(model_dir),
            "dtype": "float32",
            "max_total_tokens": 96,
            "kv_cache_memory": 4 * 2**20,  # a small pool: warmup zero-fills it
            "cache_dir": str(model_dir / "cache"),
            **values,
        },
        environ,
    )


@pytest.fixture
def serve(model_dir: Path) -> Iterator[Any]:
    """Build states on the tiny model; their routers are stopped (workers closed) after."""
    states: list[ServerState] = []

    def factory(**values: Any) -> ServerState:
        state = build_state(prepare(configure(model_dir, **values)))
        states.append(state)
        return state

    yield factory
    for state in states:  # a test that failed before stopping its router leaves no worker
        state.router.engine.close()


def token_ids(events: list[Event]) -> list[int]:
    return [e.token.id for e in events if isinstance(e, TokenEvent | FinalEvent)]


async def generate_all(state: ServerState, max_new_tokens: int = 12) -> list[list[int]]:
    """`PROMPTS` together (one batch), greedy."""
    handles = [submit(state, p, max_new_tokens=max_new_tokens) for p in PROMPTS]
    return [
        token_ids(events)
        for events in await asyncio.gather(*(collect(h.events()) for h in handles))
    ]


async def generate_then_stop(state: ServerState) -> list[list[int]]:
    """`generate_all` on a fresh router, stopped after (its worker closed)."""
    state.router.start()
    try:
        return await generate_all(state)
    finally:
        await state.router.stop()


async def test_a_worker_serves_the_tokens_of_the_in_process_engine(serve: Any) -> None:
    local, worker = serve(engine_process=False), serve()
    assert local.router.engine.description.placement == "thread"
    described = worker.router.engine.description
    assert described.placement == "process" and described.pid != os.getpid()
    assert described.capabilities == local.router.engine.description.capabilities
    # why the backend computes in its dtype crosses the process boundary (/info shows it)
    assert described.dtype_reason == local.router.engine.description.dtype_reason
    assert described.dtype_reason == "--dtype float32 was asked for"
    # and so do the backend's own details (its attention and linears)
    assert described.details == local.router.engine.description.details
    assert set(described.details) == {"decode_attention", "linears", "layer_ops"}
    # started with glibc's malloc asking for huge pages (TGI_ENGINE_HUGE_PAGES, default on)
    environ = Path(f"/proc/{described.pid}/environ").read_bytes().split(b"\0")
    tunables = [v for v in environ if v.startswith(b"GLIBC_TUNABLES=")]
    assert tunables and b"glibc.malloc.hugetlb=1" in tunables[0]
    results = [await generate_then_stop(state) for state in (local, worker)]
    assert results[0] == results[1]
    assert all(len(tokens) == 12 for tokens in results[1])


def test_worker_environments_ask_for_huge_pages_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    start = worker_start(prepare(configure(model_dir)), frozenset())
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    asked = WorkerEngine(start, step_timeout_s=1.0, huge_pages=True).worker_environments()
    assert [env["GLIBC_TUNABLES"] for env in asked] == ["glibc.malloc.hugetlb=1"]
    plain = WorkerEngine(start, step_timeout_s=1.0).worker_environments()
    assert ["GLIBC_TUNABLES" in env for env in plain] == [False]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # added to
    (env,) = WorkerEngine(start, step_timeout_s=1.0, huge_pages=True).worker_environments()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's own choice
    (env,) = WorkerEngine(start, step_timeout_s=1.0, huge_pages=True).worker_environments()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


async def test_a_killed_worker_fails_its_requests_and_a_fresh_one_serves_the_queue(
    serve: Any,
) -> None:
    state = serve(max_batch_size=1)  # one running row: the others queue
    router = state.router
    router.start()
    try:
        want = await generate_all(state)  # before: the fresh worker's tokens
        first_pid = router.engine.description.pid
        running = submit(state, PROMPTS[0], max_new_tokens=80)
        queued = [submit(state, p, max_new_tokens=12) for p in PROMPTS[1:]]
        stream = running.events()
        assert isinstance(await stream.__anext__(), TokenEvent)
        os.kill(first_pid, signal.SIGKILL)
        failed = await collect(stream)
        served = [token_ids(await collect(h.events())) for h in queued]
        again = await generate_all(state)  # prefixes cached before the crash are gone
        stats = await router.engine_stats()
    finally:
        await router.stop()
    last = failed[-1]
    assert isinstance(last, ErrorEvent) and last.error_type == "unhealthy"
    assert "SIGKILL" in last.message
    assert served == want[1:]
    assert again == want
    assert router.restarts == 1 and router.healthy
    assert router.engine.description.pid != first_pid
    assert stats.num_tracked == 0


async def test_a_hung_worker_is_killed_at_the_step_timeout(serve: Any) -> None:
    state = serve(engine_step_timeout=1.0)
    router = state.router
    router.start()
    pid = router.engine.description.pid
    try:
        handle = submit(state, PROMPTS[0], max_new_tokens=80)
        stream = handle.events()
        assert isinstance(await stream.__anext__(), TokenEvent)
        os.kill(pid, signal.SIGSTOP)  # alive, never answering
        started = time.monotonic()
        last = (await collect(stream))[-1]
        waited = time.monotonic() - started
        after = token_ids(await collect(submit(state, "x", max_new_tokens=3).events()))
    finally:
        await router.stop()
    assert isinstance(last, ErrorEvent) and "no answer" in last.message
    assert waited < 30
    assert len(after) == 3
    with pytest.raises(ProcessLookupError):  # killed, not left stopped
        os.kill(pid, 0)


def test_a_backend_that_fails_to_load_is_an_error_naming_the_cause(model_dir: Path) -> None:
    prepared: Prepared = prepare(configure(model_dir))
    start = worker_start(prepared, frozenset({0}))
    broken = StartWorker(**{**_fields(start), "model_path": str(model_dir / "missing")})
    with pytest.raises(ConfigError, match=r"missing has no config\.json"):
        WorkerEngine.spawn(broken, step_timeout_s=30)


def test_steps_submitted_ahead_come_back_in_order_between_other_calls(serve: Any) -> None:
    """`submit` gets no answer; `collect` gets the oldest step's result, whatever calls
    (health, KV usage) came between."""
    local, worker = serve(engine_process=False), serve()
    plans = [StepPlan(new=(NewSequence(1, (5, 6, 7, 8), block_ids=(0, 1)),), step_index=1)]
    plans += [
        StepPlan(running=(RunningSequence(1, 4 + i, decode=True),), step_index=2 + i)
        for i in range(3)
    ]
    want = [local.router.engine.run(plan).tokens for plan in plans]  # type: ignore[attr-defined]
    engine = worker.router.engine
    engine.submit(plans[0])
    engine.submit(plans[1])
    engine.health()
    assert engine.kv_usage().seq_ids == frozenset({1})
    first = engine.collect()
    engine.submit(plans[2])
    engine.submit(plans[3])
    results = [first, *(engine.collect() for _ in range(3))]
    assert [result.step_index for result in results] == [1, 2, 3, 4]
    assert [[t[:2] for t in result.tokens] for result in results] == [
        [t[:2] for t in tokens] for tokens in want
    ]
    assert not any(result.kept_in_flight for result in results)  # a CPU lands at once


def test_close_stops_the_worker_and_later_calls_raise(model_dir: Path) -> None:
    prepared = prepare(configure(model_dir))
    engine = WorkerEngine.spawn(worker_start(prepared, frozenset({0})), step_timeout_s=30)
    pid = engine.pid
    assert pid is not None and engine.kv_usage().seq_ids == frozenset()
    engine.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(EngineDied):
        engine.kv_usage()


def test_a_worker_does_not_outlive_its_server(model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL the front process: its worker notices within a poll and exits."""
    config = configure(model_dir)
    script = tmp_path / "front.py"
    script.write_text(
        "import sys, time\n"
        "from tgi.config import ServeConfig\n"
        "from tgi.engine.worker.client import WorkerEngine\n"
        "from tgi.launcher import prepare, worker_start\n"
        "prepared = prepare(ServeConfig.model_validate_json(sys.stdin.read()))\n"
        "engine = WorkerEngine.spawn(worker_start(prepared, frozenset({0})), step_timeout_s=30)\n"
        "print(engine.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    front = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert front.stdin is not None and front.stdout is not None
    front.stdin.write(config.model_dump_json())
    front.stdin.close()
    worker_pid = int(front.stdout.readline())
    front.kill()
    front.wait()
    for _ in range(100):
        if not _alive(worker_pid):
            return
        time.sleep(0.05)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail("the worker outlived its front process")


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, reaped by init later, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _fields(start: StartWorker) -> dict[str, Any]:
    return {name: getattr(start, name) for name in start.__dataclass_fields__}


async def test_a_worker_killed_while_idle_is_replaced_before_the_next_request(
    serve: Any,
) -> None:
    state = serve()
    router = state.router
    router.start()
    pid = router.engine.description.pid
    try:
        want = await generate_all(state)
        os.kill(pid, signal.SIGKILL)
        for _ in range(1000):  # the idle router looks every second
            if router.restarts:
                break
            await asyncio.sleep(0.01)
        got = await generate_all(state)
    finally:
        await router.stop()
    assert router.restarts == 1 and router.engine.description.pid != pid
    assert got == want


@pytest.mark.once  # see pyproject.toml
async def test_two_shards_serve_the_tokens_of_one_and_stop_with_the_server(serve: Any) -> None:
    one, two = serve(), serve(num_shard=2)
    engine = two.router.engine
    assert isinstance(engine, WorkerEngine) and len(engine.rank_pids) == 2
    results = [await generate_then_stop(state) for state in (one, two)]
    assert results[0] == results[1]
    assert all(len(tokens) == 12 for tokens in results[1])
    assert not any(_alive(pid) for pid in engine.rank_pids), "a rank outlived stop()"


@pytest.mark.once  # see pyproject.toml
async def test_rank_1_killed_mid_stream_gives_503s_and_every_rank_restarts(serve: Any) -> None:
    state = serve(num_shard=2, max_batch_size=1)
    router = state.router
    engine = router.engine
    assert isinstance(engine, WorkerEngine)
    router.start()
    try:
        want = await generate_all(state)
        before = engine.rank_pids
        stream = submit(state, PROMPTS[0], max_new_tokens=80).events()
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
