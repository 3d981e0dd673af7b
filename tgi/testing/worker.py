"""The conformance suite's `worker` variant: the backend in an engine worker process.

NOTE: `tgi serve` runs the backend in a worker (`tgi.engine.worker`) that builds it
itself, through the plugin's `tgi_backend_create`, from the `StartWorker` message the
launcher sends. The `worker` variant of `BackendConformance` checks that path: a
subclass says what `tgi serve` would send (`start_worker` builds it as the launcher
does), the suite spawns one `WorkerEngine` per test class and drives it with
`Driver(..., engine=...)`:

    start_worker   ServeConfig (resolve_config, the plugin's validate, derive_limits)
                   + the model directory inspected as the launcher inspects it
    SuiteWorker    the spawned, warmed worker a test class shares; each test leaves it
                   holding nothing (`Driver.release_all`, then `check_idle`)
    EngineBackend  the engine where a test calls a backend (capabilities, kv_usage,
                   release, health); plans go through `Driver`, never `step`
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgi.backend.contract import (
    Capabilities,
    KVUsage,
    Limits,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.engine.protocol import Engine
from tgi.engine.worker.client import WorkerEngine
from tgi.engine.worker.messages import StartWorker

__all__ = ["EngineBackend", "SuiteWorker", "start_worker"]

# Seconds one step of a tiny model may take in the worker before it counts as hung.
STEP_TIMEOUT_S = 120.0


def start_worker(
    model_dir: Path,
    limits: Limits,
    settings: Mapping[str, Any],
    environ: Mapping[str, str],
) -> StartWorker:
    """The `StartWorker` `tgi serve --model-id model_dir` would send with `settings`
    (ServeConfig field -> value, as given on the command line) under `environ`.

    It takes the launcher's own steps (`tgi.launcher.prepare`: select the backend,
    inspect the model, let the plugin validate the config, derive the limits); the
    token limits are the suite's `limits`, so the worker is configured for the shapes
    its warmup will be asked for.
    """
    from tgi.config import resolve_config
    from tgi.launcher import prepare, worker_start

    config = resolve_config(
        {
            "model_id": str(model_dir),
            "max_input_tokens": limits.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens,
            "max_batch_prefill_tokens": limits.max_batch_prefill_tokens,
            "max_batch_total_tokens": limits.max_batch_total_tokens,
            "max_batch_size": limits.max_batch_size,
            **settings,
        },
        environ,
    )
    # only grammar matchers read EOS ids, and the suite sends no grammar
    return worker_start(prepare(config), frozenset())


@dataclass(slots=True)
class SuiteWorker:
    """One spawned and warmed worker, shared by the tests of a class (a spawn costs
    seconds: a fresh interpreter imports torch and loads the model)."""

    engine: WorkerEngine
    report: WarmupReport  # its one warmup, with the suite's limits
    # The capabilities of the backend the subclass's factory builds, once read: the
    # worker must have built the same kind of backend, or the variant tests another.
    factory_capabilities: Capabilities | None = None

    @classmethod
    def spawn(cls, start: StartWorker, limits: Limits) -> SuiteWorker:
        engine = WorkerEngine.spawn(start, step_timeout_s=STEP_TIMEOUT_S)
        try:
            return cls(engine, engine.warmup(limits))
        except BaseException:
            engine.close()
            raise

    def check_built_like(self, capabilities: Capabilities) -> None:
        """Raise unless the worker's backend declares `capabilities` (the factory's);
        split over ranks, it takes no `FedTokens` (a tensor on rank 0's device does not
        reach the others), whatever one shard would."""
        got = self.engine.description.capabilities
        if self.engine.world_size > 1:
            capabilities = dataclasses.replace(capabilities, fed_tokens=False)
        if got != capabilities:
            raise AssertionError(
                "the worker built another backend than the subclass's backend_factory: "
                f"its capabilities are {got}, the factory's {capabilities}; make "
                "worker_start select the factory's engine"
            )

    def check_idle(self) -> None:
        """Raise unless the worker holds no sequence: neither KV nor sampler state (a
        test's leftovers would change what the next test sees under the same ids)."""
        usage, stats = self.engine.kv_usage(), self.engine.stats()
        if usage.seq_ids or usage.used_tokens or stats.num_tracked:
            raise AssertionError(
                f"the worker still holds sequences after the test released them: {usage}, {stats}"
            )


class EngineBackend:
    """An `Engine` where a test expects a `Backend`: capabilities, kv_usage, release
    and health go to the engine. Steps go through `Driver(..., engine=...)`, which
    takes the engine's sampled tokens; `step` refuses, as an engine has no logits."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.description.capabilities

    def warmup(self, limits: Limits) -> WarmupReport:
        return self.engine.warmup(limits)

    def step(self, plan: StepPlan) -> StepOutput:
        raise TypeError(
            "an engine returns sampled tokens, not logits: send plans through "
            "Driver(..., engine=...)"
        )

    def release(self, seq_ids: Sequence[int]) -> None:
        self.engine.release(seq_ids)

    def kv_usage(self) -> KVUsage:
        return self.engine.kv_usage()

    def health(self) -> None:
        self.engine.health()

    def close(self) -> None:
        """Nothing: the engine outlives the test; whoever spawned it closes it."""
