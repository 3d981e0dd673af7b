"""`LocalEngine`: the backend and the sampler on the router's engine thread, in-process.

What `--no-engine-process` serves with, and what tests that hand the server a backend
object get. It cannot die on its own (a crash here is the server's), so it never
raises `EngineDied` and has nothing to restart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tgi.backend.contract import Backend, KVUsage, Limits, StepPlan, WarmupReport
from tgi.engine.core import EngineCore
from tgi.engine.protocol import EngineDescription, EngineStats
from tgi.engine.results import StepResult

if TYPE_CHECKING:
    from tgi.sampling.grammar import GrammarCompiler

__all__ = ["LocalEngine", "describe_backend"]


def describe_backend(backend: Backend, placement: str) -> EngineDescription:
    """What a backend object says of itself (dtype and device type are optional)."""
    dtype = getattr(backend, "dtype", None)
    return EngineDescription(
        capabilities=backend.capabilities,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        device_type=str(getattr(backend, "device_type", "") or ""),
        placement=placement,
        pid=os.getpid(),
        dtype_reason=getattr(backend, "dtype_reason", None),
        details={str(k): str(v) for k, v in getattr(backend, "engine_details", {}).items()},
    )


class LocalEngine:
    """An `Engine` over a backend object of this process."""

    def __init__(
        self,
        backend: Backend,
        grammars: GrammarCompiler | None = None,
        *,
        owns_backend: bool = False,  # close the backend with the engine
        keep_in_flight: bool | None = None,  # `EngineCore`'s: True to overlap on a CPU
    ) -> None:
        self.backend = backend
        self._owns_backend = owns_backend
        self.core = EngineCore(backend, grammars, keep_in_flight=keep_in_flight)
        self._description = describe_backend(backend, "thread")

    @property
    def description(self) -> EngineDescription:
        return self._description

    def warmup(self, limits: Limits) -> WarmupReport:
        return self.backend.warmup(limits)

    def run(self, plan: StepPlan) -> StepResult:
        """`submit` then `collect`: one step start to end (tests, simple drivers)."""
        return self.core.run(plan)

    def submit(self, plan: StepPlan) -> None:
        self.core.submit(plan)

    def collect(self) -> StepResult:
        return self.core.collect()

    def release(self, seq_ids: Sequence[int]) -> KVUsage:
        return self.core.release(seq_ids)

    def kv_usage(self) -> KVUsage:
        return self.backend.kv_usage()

    def health(self) -> None:
        self.backend.health()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def exited(self) -> str | None:
        return None  # it runs as long as this process does

    def restart(self) -> WarmupReport:
        raise NotImplementedError("an in-process engine dies with the server; nothing restarts")

    def close(self) -> None:
        if self._owns_backend:
            self.backend.close()
