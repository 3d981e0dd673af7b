"""The worker process: load the backend, then answer the front process until told to stop.

NOTE: everything runs on this process's main thread, from loading the weights to the
last step, so the CPU math libraries keep one thread pool (see tgi/engine/thread.py).
The worker ignores SIGINT (Ctrl-C reaches the whole process group; the front process
decides when the worker stops) and exits by itself when the front process goes away,
so no worker outlives its server.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from tgi.backend.contract import Backend, Limits, StepPlan
from tgi.engine.core import EngineCore
from tgi.engine.local import describe_backend
from tgi.engine.worker.channel import Channel, ChannelClosed
from tgi.engine.worker.messages import (
    Done,
    Query,
    Release,
    StartWorker,
    WorkerFailure,
    WorkerReady,
)
from tgi.errors import BackendError, BackendUnavailable, ConfigError
from tgi.logs import setup_logging

__all__ = ["main", "serve"]

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0  # the front process sends StartWorker as soon as it sees us


class ParentGone(RuntimeError):
    """The front process exited: nobody will read another answer."""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tgi.engine.worker ADDRESS", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        return serve(argv[0], parent=os.getppid())
    except (ParentGone, ChannelClosed):  # the front process went away: nobody to answer
        return 0


def serve(address: str, *, parent: int) -> int:
    """Answer the front process at `address` until it says `shutdown` (0) or the
    backend fails to load (1)."""

    def parent_alive() -> None:
        if os.getppid() != parent:
            raise ParentGone("the front process exited")

    channel = Channel.connect(address)
    try:
        start = channel.receive((StartWorker,), timeout_s=_START_TIMEOUT_S, peer_alive=parent_alive)
        from tgi.config import ServeConfig

        config = ServeConfig.model_validate_json(start.config_json)
        setup_logging(config.json_output, process=f"engine worker {start.rank}")
        try:
            backend, core = _load(start, config)
        except Exception as exc:
            logger.exception("the backend failed to load")
            channel.send(_failure("load", exc))
            return 1
        description = describe_backend(backend, "process")
        channel.send(
            WorkerReady(
                description.capabilities,
                description.dtype,
                description.device_type or start.backend,
                os.getpid(),
            )
        )
        logger.info("backend %s loaded in pid %d", start.backend, os.getpid())
        return _answer(channel, backend, core, parent_alive)
    finally:
        channel.close()


def _answer(channel: Channel, backend: Backend, core: EngineCore, alive: Callable[[], None]) -> int:
    kinds = (StepPlan, Limits, Release, Query)
    while True:
        message = channel.receive(kinds, peer_alive=alive)
        if isinstance(message, StepPlan):
            answer: object = core.run(message)  # never raises for a backend failure
        else:
            try:
                answer = _call(message, backend, core)
            except Exception as exc:
                logger.exception("%s failed", _call_name(message))
                answer = _failure(_call_name(message), exc)
        channel.send(answer)  # type: ignore[arg-type]
        if isinstance(message, Query) and message.call == "shutdown":
            return 0


def _call(message: Limits | Release | Query, backend: Backend, core: EngineCore) -> object:
    if isinstance(message, Limits):
        return backend.warmup(message)
    if isinstance(message, Release):
        return core.release(message.seq_ids)
    if message.call == "kv_usage":
        return backend.kv_usage()
    if message.call == "health":
        backend.health()
        return Done()
    if message.call == "stats":
        return core.stats()
    backend.close()  # shutdown
    return Done()


def _call_name(message: object) -> str:
    if isinstance(message, Query):
        return message.call
    return {Limits: "warmup", Release: "release"}.get(type(message), type(message).__name__)


def _load(start: StartWorker, config: object) -> tuple[Backend, EngineCore]:
    """The backend the front process selected, built for this rank, and its engine core
    (with grammar matchers compiled here, from the grammars' source)."""
    from tgi.backend.manager import select_backend
    from tgi.config import ServeConfig
    from tgi.sampling.grammar import GrammarCompiler

    assert isinstance(config, ServeConfig)
    selected = select_backend(config.model_copy(update={"backend": start.backend}))
    files = start.model_files()
    backend = selected.create_backend(config, files, start.rank, start.world_size)
    grammars = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            files.path, trust_remote_code=config.trust_remote_code
        )
        grammars = GrammarCompiler.from_hf_tokenizer(tokenizer, start.eos_token_ids)
    except Exception:  # the front process refuses grammars it cannot compile either
        logger.exception("no grammar compiler in the worker")
    return backend, EngineCore(backend, grammars)


def _failure(call: str, exc: BaseException) -> WorkerFailure:
    """The exception as data; the front process raises its kind again (`_raised`)."""
    if isinstance(exc, ConfigError):
        return WorkerFailure(call, "config", str(exc))
    if isinstance(exc, BackendUnavailable):
        return WorkerFailure(call, "unavailable", str(exc))
    if isinstance(exc, BackendError):
        return WorkerFailure(call, "backend", str(exc))
    return WorkerFailure(call, "other", f"{type(exc).__name__}: {exc}")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (belt and braces with
    the parent check between polls). Linux sends it when the parent *thread* that
    started us exits: that is the router's engine thread, which outlives its worker."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
