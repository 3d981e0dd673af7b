"""The worker process: load the backend, then answer the front process until told to stop.

NOTE: everything runs on this process's main thread, from loading the weights to the
last step, so the CPU math libraries keep one thread pool (see tgi/engine/thread.py).
The worker ignores SIGINT (Ctrl-C reaches the whole process group; the front process
decides when the worker stops) and exits by itself when the front process goes away,
so no worker outlives its server.

With `--num-shard N` there is one worker per rank (`tgi.parallel.ranks`' NOTE). Rank 0
talks to the front process and forms the rank group with the others
(`python -m tgi.engine.worker --follower`, their rank in RANK); it hands them the
`StartWorker` it received, every rank loads its slice, and rank 0 answers `WorkerReady`
only once every rank loaded (else a failure naming the ranks that did not). A rank that
loses its peers exits with `EXIT_PEER_LOST`: the front process sees a dead worker and
starts every rank again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NoReturn

from tgi.backend import wire
from tgi.backend.contract import Backend, Limits, StepPlan
from tgi.engine.core import EngineCore
from tgi.engine.local import describe_backend
from tgi.engine.worker.channel import Channel, ChannelClosed
from tgi.engine.worker.messages import (
    EXIT_PEER_LOST,
    EXIT_RANK_FAILED,
    Done,
    Query,
    Release,
    StartWorker,
    WorkerFailure,
    WorkerReady,
)
from tgi.errors import BackendError, BackendUnavailable, ConfigError
from tgi.logs import setup_logging
from tgi.parallel import set_rank_group
from tgi.parallel.env import rank_environment
from tgi.parallel.group import PeerLost, ShardGroup
from tgi.parallel.ranks import LeaderBackend, RankFailed, follow

if TYPE_CHECKING:
    from tgi.config import ServeConfig

__all__ = ["EXIT_PEER_LOST", "main", "serve", "serve_follower"]

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0  # the front process sends StartWorker as soon as it sees us


class ParentGone(RuntimeError):
    """The front process exited: nobody will read another answer."""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tgi.engine.worker ADDRESS | --follower", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if argv[0] == "--follower":
        return serve_follower(os.environ)
    try:
        return serve(argv[0], parent=os.getppid())
    except (ParentGone, ChannelClosed):  # the front process went away: nobody to answer
        return 0
    except PeerLost:
        _exit_now(EXIT_PEER_LOST, "another rank is gone")


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
        group = _join(start.world_size, os.environ)
        if group is not None:
            group.broadcast_bytes(wire.encode(start))
        try:
            backend, core = _load(start, config, group)
        except Exception as exc:
            logger.exception("the backend failed to load")
            if group is not None:
                group.gather_text(f"{type(exc).__name__}: {exc}")
            channel.send(_failure("load", exc))
            return 1
        if group is not None:
            failed = [f"rank {r}: {e}" for r, e in enumerate(group.gather_text("")) if e]
            if failed:
                channel.send(WorkerFailure("load", "backend", "; ".join(failed)))
                return 1
        description = describe_backend(backend, "process")
        channel.send(
            WorkerReady(
                description.capabilities,
                description.dtype,
                description.device_type or start.backend,
                os.getpid(),
                description.dtype_reason,
                description.details,
            )
        )
        logger.info("backend %s loaded in pid %d", start.backend, os.getpid())
        return _answer(channel, backend, core, parent_alive, group)
    finally:
        channel.close()


def serve_follower(environ: Mapping[str, str]) -> int:
    """Rank r > 0: join the group, load this rank's slice of the backend rank 0 names,
    then run rank 0's calls until it says shutdown (0), is gone (`EXIT_PEER_LOST`) or a
    call fails here (`EXIT_RANK_FAILED`).

    SIGTERM and SIGINT are ignored: under torchrun they reach every rank at once, and
    rank 0 drains its requests first, then tells the others to shut down."""
    job = rank_environment(environ)
    if job is None or job.rank == 0:
        print(
            "a follower needs RANK > 0, WORLD_SIZE, MASTER_ADDR and MASTER_PORT",
            file=sys.stderr,
        )
        return 2
    setup_logging(False, process=f"engine worker {job.rank}")
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)
    group = _join(job.world_size, environ)
    assert group is not None
    try:
        start = wire.decode(group.broadcast_bytes(None), StartWorker)
        from tgi.config import ServeConfig

        config = ServeConfig.model_validate_json(start.config_json)
        setup_logging(config.json_output, process=f"engine worker {job.rank}")
        start = dataclasses.replace(start, rank=job.rank)
        error = ""
        try:
            backend = _create_backend(start, config)  # it never samples: no engine core
        except Exception as exc:
            logger.exception("the backend failed to load")
            error = f"{type(exc).__name__}: {exc}"
        if any(group.gather_text(error)):
            return 1
        logger.info("rank %d of %d loaded in pid %d", job.rank, job.world_size, os.getpid())
        follow(backend, group)
        group.close()
        return 0
    except PeerLost:
        _exit_now(EXIT_PEER_LOST, "rank 0 is gone")
    except RankFailed as exc:
        _exit_now(EXIT_RANK_FAILED, str(exc))


def _exit_now(status: int, why: str) -> NoReturn:
    """End a rank whose group is broken or out of step, now: tearing down a process
    group at interpreter exit can block for seconds, and the front process is waiting."""
    logger.error("exiting: %s", why)
    logging.shutdown()
    os._exit(status)


def _join(world_size: int, environ: Mapping[str, str]) -> ShardGroup | None:
    """Join the rank group the environment describes (None when serving alone)."""
    if world_size == 1:
        return None
    job = rank_environment(environ)
    if job is None or job.world_size != world_size:
        raise ConfigError(
            f"{world_size} ranks but the worker's environment does not describe them "
            "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    group = ShardGroup.join(job.rank, job.world_size)
    set_rank_group(group)
    return group


def _answer(
    channel: Channel,
    backend: Backend,
    core: EngineCore,
    alive: Callable[[], None],
    group: ShardGroup | None,
) -> int:
    kinds = (StepPlan, Limits, Release, Query)
    while True:
        message = channel.receive(kinds, peer_alive=alive)
        answer: object
        if isinstance(message, StepPlan):
            core.submit(message)  # never raises for a backend failure; answered by collect
            if group is not None and group.broken is not None:
                raise PeerLost(group.broken)
            continue
        if isinstance(message, Query) and message.call == "collect":
            answer = core.collect()
        else:
            try:
                answer = _call(message, backend, core)
            except Exception as exc:
                logger.exception("%s failed", _call_name(message))
                answer = _failure(_call_name(message), exc)
        if group is not None and group.broken is not None:
            # the step's rows failed because a rank is gone; so is this engine
            raise PeerLost(group.broken)
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


def _create_backend(start: StartWorker, config: ServeConfig) -> Backend:
    """The backend the front process selected, built for this rank."""
    from tgi.backend.manager import select_backend

    selected = select_backend(config.model_copy(update={"backend": start.backend}))
    return selected.create_backend(config, start.model_files(), start.rank, start.world_size)


def _load(
    start: StartWorker, config: ServeConfig, group: ShardGroup | None
) -> tuple[Backend, EngineCore]:
    """Rank 0's backend (a `LeaderBackend` around it when there are other ranks) and its
    engine core, with grammar matchers compiled here from the grammars' source."""
    from tgi.sampling.grammar import GrammarCompiler

    backend = _create_backend(start, config)
    if group is not None:
        backend = LeaderBackend(backend, group)
    compiler = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            start.model_path, trust_remote_code=config.trust_remote_code
        )
        compiler = GrammarCompiler.from_hf_tokenizer(tokenizer, start.eos_token_ids)
    except Exception:  # the front process refuses grammars it cannot compile either
        logger.exception("no grammar compiler in the worker")
    return backend, EngineCore(backend, compiler)


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
