"""What the router drives: an `Engine`, in this process or in a worker process.

The router never holds a backend. It holds an `Engine` whose calls run one at a time
on the router's engine thread (`tgi.engine.thread.EngineThread`) and block until the
engine answers:

    LocalEngine   (local.py)     backend + sampler on that thread, in the HTTP process
    WorkerEngine  (worker/)      backend + sampler in a worker process; the calls send
                                 the plan over a socket and wait for the result

Both take the same `StepPlan` (`submit`) and return the same `StepResult` (`collect`),
so everything above
them (policies, streaming, reconciliation) is one code path. Only a worker can die on
its own: its calls then raise `EngineDied`, and the router restarts it (`restart`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tgi.backend.contract import Capabilities, KVUsage, Limits, StepPlan, WarmupReport
from tgi.engine.results import StepResult
from tgi.errors import BackendError, BackendUnavailable

__all__ = ["Engine", "EngineDescription", "EngineDied", "EngineStats", "RestartImpossible"]


class EngineDied(BackendUnavailable):
    """The engine's process exited or stopped answering; what it held is gone.

    The router fails the requests in flight with a 503 and restarts the engine.
    """


class RestartImpossible(BackendError):
    """The engine cannot be started again from this process (its ranks belong to
    torchrun); the router gives up at once instead of retrying."""


@dataclass(frozen=True, slots=True)
class EngineDescription:
    """What the engine told the router when it started (for /info and logs)."""

    capabilities: Capabilities
    dtype: str | None  # "float32", ...; None when the backend does not say
    device_type: str
    placement: str  # "thread" (in the HTTP process) or "process" (a worker)
    pid: int  # the process the backend runs in
    dtype_reason: str | None = None  # why the backend chose its dtype, when it did
    # how the backend runs, in its own words (its `engine_details`): attention, kernels
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Per-sequence state the engine holds between steps (leak checks, /metrics)."""

    num_tracked: int  # sequences with sampler state
    num_histories: int  # ... of which keep a token history (penalties, watermark)
    num_matchers: int  # grammar matchers alive


@runtime_checkable
class Engine(Protocol):
    """One backend and its sampler. Every call blocks; the router makes them from one
    thread, one at a time."""

    @property
    def description(self) -> EngineDescription: ...

    def warmup(self, limits: Limits) -> WarmupReport:
        """Warm the backend up (once, before the first step)."""
        ...

    def submit(self, plan: StepPlan) -> None:
        """Start a step; its result comes from `collect`. The router submits the next
        plan before collecting when it planned ahead: the engine may then run the next
        forward while this step's tokens travel (`tgi.engine.core`'s NOTE)."""
        ...

    def collect(self) -> StepResult:
        """The oldest submitted step's result. A backend failure fails the step's rows
        in the result; only the engine itself going away raises (`EngineDied`)."""
        ...

    def release(self, seq_ids: Sequence[int]) -> KVUsage:
        """Free sequences outside a step (shutdown)."""
        ...

    def kv_usage(self) -> KVUsage: ...

    def health(self) -> None:
        """A real one-token forward; raises when the backend cannot serve."""
        ...

    def stats(self) -> EngineStats: ...

    def exited(self) -> str | None:
        """Why the engine is gone, or None while it runs; answers at once, from any
        thread (the router asks while idle, when no call would notice)."""
        ...

    def restart(self) -> WarmupReport:
        """Replace a dead engine with a fresh, warmed one holding no sequence."""
        ...

    def close(self) -> None: ...
