"""`WorkerEngine`: the engine in a worker process, driven from the HTTP process.

NOTE: the calls block, like `LocalEngine`'s, and run on the router's engine thread;
the socket is used from that thread alone. A worker is watched as a process, not
trusted to answer: every wait checks between 100 ms poll slices that the process is
still there, and a step has a deadline (`--engine-step-timeout`). Either way it ends
the same: the worker is killed if it is not dead yet and the call raises
`EngineDied`, which the router turns into 503s and a `restart`.

    spawn:   ChannelListener ── python -m tgi.engine.worker ADDRESS ── StartWorker
             ◄── WorkerReady (capabilities, dtype, pid)
    warmup:  Limits ──► ◄── WarmupReport      (kept: a restart warms with the same
                                                limits and must report the same room)
    step:    StepPlan ──►                     (no answer: the next plan may follow)
             Query("collect") ──► ◄── StepResult   (the oldest step's)

With several ranks (`StartWorker.world_size` > 1) the engine is one worker per rank:
rank 0 as above, the others `python -m tgi.engine.worker --follower`, all given
torch.distributed's variables (a fresh loopback MASTER_PORT each start). Every one of
them is watched; any one dying kills the rest and fails the engine, and a restart
starts them all again. Under torchrun (`external_ranks`) the other ranks belong to
torchrun: only rank 0 is started here, and a lost rank cannot be restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TypeVar

from tgi.backend.contract import KVUsage, Limits, StepPlan, WarmupReport
from tgi.engine.protocol import EngineDescription, EngineDied, EngineStats, RestartImpossible
from tgi.engine.results import StepResult
from tgi.engine.worker.channel import Channel, ChannelClosed, ChannelListener, ChannelTimeout
from tgi.engine.worker.messages import (
    EXIT_PEER_LOST,
    Done,
    Query,
    Release,
    StartWorker,
    WorkerFailure,
    WorkerReady,
)
from tgi.errors import BackendError, BackendUnavailable, ConfigError

__all__ = ["WorkerEngine", "describe_exit", "with_huge_pages"]

logger = logging.getLogger(__name__)

A = TypeVar("A")

_SHUTDOWN_S = 10.0  # how long a worker may take to close its backend on shutdown


def describe_exit(code: int) -> str:
    """A process's exit status in words (negative: killed by that signal)."""
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"{name} (out of memory, or killed by an operator)"
    return name


class WorkerEngine:
    """An `Engine` whose backend and sampler run in a child process."""

    def __init__(
        self,
        start: StartWorker,
        *,
        step_timeout_s: float,
        start_timeout_s: float = 1800.0,
        external_ranks: bool = False,
        huge_pages: bool = False,
    ) -> None:
        """`huge_pages`: start the workers with glibc's malloc asking for transparent huge
        pages (`with_huge_pages`)."""
        self._start = start
        self._huge_pages = huge_pages
        self._step_timeout_s = step_timeout_s
        self._start_timeout_s = start_timeout_s  # loading and warming a large model
        self._external_ranks = external_ranks  # ranks > 0 started by torchrun, not here
        self._process: subprocess.Popen[bytes] | None = None  # rank 0
        self._followers: list[subprocess.Popen[bytes]] = []  # ranks 1.. started here
        self._channel: Channel | None = None
        self._description: EngineDescription | None = None
        self._limits: Limits | None = None
        self._report: WarmupReport | None = None
        self._dead: str | None = None  # why the worker is gone, until a restart
        self.restarts = 0

    @classmethod
    def spawn(
        cls,
        start: StartWorker,
        *,
        step_timeout_s: float,
        external_ranks: bool = False,
        huge_pages: bool = False,
    ) -> WorkerEngine:
        """Start the worker (each rank's) and wait until its backend has loaded."""
        engine = cls(
            start,
            step_timeout_s=step_timeout_s,
            external_ranks=external_ranks,
            huge_pages=huge_pages,
        )
        try:
            engine._spawn()
        except BaseException:
            engine._stop_process()  # no process or socket left behind a failed start
            raise
        return engine

    # ---- the Engine protocol --------------------------------------------------------

    @property
    def description(self) -> EngineDescription:
        assert self._description is not None, "the worker has not started"
        return self._description

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def world_size(self) -> int:
        """Ranks the engine spans (one worker process each)."""
        return self._start.world_size

    @property
    def rank_pids(self) -> list[int]:
        """The worker processes started here, rank 0 first (one unless sharded)."""
        if self._process is None:
            return []
        return [self._process.pid, *(process.pid for process in self._followers)]

    def warmup(self, limits: Limits) -> WarmupReport:
        report = self._ask(limits, WarmupReport, self._start_timeout_s, "warmup")
        self._limits, self._report = limits, report
        return report

    def run(self, plan: StepPlan) -> StepResult:
        """`submit` then `collect`: one step start to end (tests, simple drivers)."""
        self.submit(plan)
        return self.collect()

    def submit(self, plan: StepPlan) -> None:
        """Send the plan; the worker answers only `collect` (its `Query`)."""
        if self._dead is not None or self._channel is None:
            raise EngineDied(f"the engine worker is gone: {self._dead or 'never started'}")
        try:
            self._channel.send(plan)
        except ChannelClosed:
            self._exited()

    def collect(self) -> StepResult:
        return self._ask(Query("collect"), StepResult, self._step_timeout_s, "a step")

    def release(self, seq_ids: Sequence[int]) -> KVUsage:
        return self._ask(Release(tuple(seq_ids)), KVUsage, self._step_timeout_s, "release")

    def kv_usage(self) -> KVUsage:
        return self._ask(Query("kv_usage"), KVUsage, self._step_timeout_s, "kv_usage")

    def health(self) -> None:
        self._ask(Query("health"), Done, self._step_timeout_s, "health")

    def stats(self) -> EngineStats:
        return self._ask(Query("stats"), EngineStats, self._step_timeout_s, "stats")

    def exited(self) -> str | None:
        if self._process is None or self._dead is not None:
            return self._dead
        for rank, process in self._ranks():
            code = process.poll()  # Popen.poll takes its own lock: safe beside the thread
            if code is not None:
                name = _rank_name(rank, process)
                return f"the engine worker {name} ended with {describe_exit(code)}"
        return None

    def restart(self) -> WarmupReport:
        """A fresh worker, loaded and warmed with the first warmup's limits; it must
        offer at least the room the router's policy was built for."""
        assert self._limits is not None and self._report is not None, "restart before warmup"
        if self._external_ranks:
            raise RestartImpossible(
                f"the engine's ranks belong to torchrun and rank 0's worker is gone "
                f"({self._dead}; exit status {EXIT_PEER_LOST} means another rank went away "
                "first: torchrun's failure summary names it); restart the job"
            )
        self._stop_process()
        try:
            self._spawn()
        except BaseException:
            self._stop_process()
            raise
        report = self._ask(self._limits, WarmupReport, self._start_timeout_s, "warmup")
        before = self._report
        if (
            report.kv.total_tokens < before.kv.total_tokens
            or (report.kv.num_blocks or 0) < (before.kv.num_blocks or 0)
            or report.constraints != before.constraints
        ):
            self._kill("it warmed up to less room than the router plans for")
            raise BackendError(
                f"the restarted engine reports {report.kv} and {report.constraints}; the "
                f"router was built for {before.kv} and {before.constraints}"
            )
        self.restarts += 1
        return report

    def close(self) -> None:
        """Ask the worker to close its backend and exit; kill it if it does not."""
        if self._process is not None and self._dead is None:
            try:
                self._ask(Query("shutdown"), Done, _SHUTDOWN_S, "shutdown")
                self._process.wait(timeout=_SHUTDOWN_S)
            except (EngineDied, BackendUnavailable, subprocess.TimeoutExpired):
                pass
            except Exception:
                logger.exception("the engine worker did not shut down cleanly")
        self._stop_process()
        self._dead = "closed"

    # ---- internals ------------------------------------------------------------------

    def worker_environments(self) -> list[dict[str, str]]:
        """The environment of each worker process this engine starts, rank 0 first."""
        world_size = self._start.world_size
        environments = [os.environ.copy()]
        if world_size > 1 and not self._external_ranks:
            environments = _rank_environments(world_size)
        if self._huge_pages:
            environments = [with_huge_pages(env) for env in environments]
        return environments

    def _spawn(self) -> None:
        listener = ChannelListener()
        world_size = self._start.world_size
        environments = self.worker_environments()
        try:
            self._process = _start_process(listener.address, environments[0])
            self._followers = [_start_process("--follower", env) for env in environments[1:]]
            self._dead = None
            logger.info(
                "engine worker started: pid %d%s",
                self._process.pid,
                f" (rank 0 of {world_size}; ranks 1.. pids "
                f"{', '.join(str(p.pid) for p in self._followers) or 'started by torchrun'})"
                if world_size > 1
                else "",
            )
            self._channel = listener.accept(
                timeout_s=self._start_timeout_s, peer_alive=self._check_alive
            )
        except BaseException:
            listener.close()
            raise
        ready = self._ask(self._start, WorkerReady, self._start_timeout_s, "load")
        self._description = EngineDescription(
            capabilities=ready.capabilities,
            dtype=ready.dtype,
            device_type=ready.device_type,
            placement="process",
            pid=ready.pid,
            dtype_reason=ready.dtype_reason,
            details=dict(ready.details),
        )

    def _ask(self, message: Any, answer: type[A], timeout_s: float, call: str) -> A:
        if self._dead is not None or self._channel is None:
            raise EngineDied(f"the engine worker is gone: {self._dead or 'never started'}")
        try:
            self._channel.send(message)
            reply = self._channel.receive(
                (answer, WorkerFailure), timeout_s=timeout_s, peer_alive=self._check_alive
            )
        except ChannelTimeout:
            self._kill(f"no answer to {call} in {timeout_s:.0f} s")
        except ChannelClosed:
            self._exited()
        if isinstance(reply, WorkerFailure):
            raise _raised(reply)
        assert isinstance(reply, answer)
        return reply

    def _check_alive(self) -> None:
        """Raise `EngineDied` when the worker process (any rank's) has exited; the other
        ranks are killed: they cannot go on without it."""
        assert self._process is not None
        for rank, process in self._ranks():
            code = process.poll()
            if code is not None:
                self._dead = f"{_rank_name(rank, process)} ended with {describe_exit(code)}"
                if self._followers:
                    self._stop_process()
                raise EngineDied(f"the engine worker {self._dead}")

    def _ranks(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        """(rank, process) of every worker started here, rank 0 last: when a follower
        dies, rank 0 exits too (it lost its peer), and the follower is the one to name."""
        assert self._process is not None
        return [*enumerate(self._followers, start=1), (0, self._process)]

    def _exited(self) -> NoReturn:
        """The worker closed its end: it is exiting; raise `EngineDied` with its status
        (at once when another rank is already gone: rank 0 closes because it lost it)."""
        assert self._process is not None
        if any(process.poll() is not None for process in self._followers):
            self._check_alive()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill("it closed the channel but did not exit")
        self._check_alive()
        raise AssertionError("unreachable: the worker exited")

    def _kill(self, why: str) -> NoReturn:
        """Kill a worker that stopped answering; raise `EngineDied` saying why."""
        assert self._process is not None
        self._dead = f"{_rank_name(0, self._process)} was killed: {why}"
        logger.error("engine worker %s", self._dead)
        self._stop_process()
        raise EngineDied(f"the engine worker {self._dead}")

    def _stop_process(self) -> None:
        for process in [*(p for p in [self._process] if p is not None), *self._followers]:
            if process.poll() is None:
                process.kill()
        for process in [*(p for p in [self._process] if p is not None), *self._followers]:
            process.wait()
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def with_huge_pages(env: dict[str, str]) -> dict[str, str]:
    """`env` with glibc's malloc tunable `hugetlb=1` added to GLIBC_TUNABLES: the worker's
    large allocations (weights, the KV pool, activations) are advised as transparent huge
    pages where the kernel allows them (THP `madvise` or `always`), so streaming them
    misses the TLB far less. SmolLM2 on 2 cores of an AMX Xeon, bf16: a 32-row decode step
    44.9 against 52.0 ms, a 2048-token prefill 440-454 against 504-515 ms. A GLIBC_TUNABLES
    that sets `glibc.malloc.hugetlb` itself is kept; other C libraries ignore it, and
    glibc before 2.35 ignores the unknown tunable."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return env
    setting = "glibc.malloc.hugetlb=1"
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}


def _start_process(address: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -m tgi.engine.worker ADDRESS|--follower` with `env`."""
    return subprocess.Popen(
        [sys.executable, "-m", "tgi.engine.worker", address],
        stdin=subprocess.DEVNULL,
        env=env,
        # its own session: a signal to the server's process group (Ctrl-C, a
        # supervisor's SIGTERM) reaches the server, which stops the worker after its
        # drain; the worker still dies with the server (PR_SET_PDEATHSIG)
        start_new_session=True,
    )


def _rank_environments(world_size: int) -> list[dict[str, str]]:
    """torch.distributed's variables for ranks 0..N-1 on this host, a fresh port each."""
    from tgi.parallel.env import free_port

    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    return [
        {
            **base,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        for rank in range(world_size)
    ]


def _rank_name(rank: int, process: subprocess.Popen[bytes]) -> str:
    return f"pid {process.pid}" if rank == 0 else f"rank {rank} (pid {process.pid})"


def _raised(failure: WorkerFailure) -> Exception:
    """The exception a failed call in the worker stands for, in this process."""
    message = f"{failure.call} failed in the engine worker: {failure.message}"
    if failure.kind == "config":
        return ConfigError(failure.message)
    if failure.kind == "unavailable":
        return BackendUnavailable(message)
    if failure.kind == "backend":
        return BackendError(message)
    return RuntimeError(message)
