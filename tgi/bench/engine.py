"""`tgi bench engine`: prefill and decode latency straight from a backend, no HTTP, no router.

TGI's `text-generation-benchmark` idea for plugin authors: for each batch size, one
step plan admits `batch_size` random prompts of `input_len` tokens (`NewSequence`s),
then `decode_steps` plans each advance the whole batch by a token (decode
`RunningSequence`s), then the batch is released; repeat `runs` times after
`warmup_runs` uncounted ones.

NOTE: a timed step is `backend.step(plan)` plus `argmax(...).tolist()` of its logits (or
`.tolist()` of the token ids a device-sampling backend returns): the one device-to-host
copy the engine also makes each step, and the only backend-neutral way to wait for a
device that computes asynchronously. Greedy tokens feed the next step's decode rows.

Addressing fields are filled the simplest valid way for each KV layout: slot b for row
b (static slots), and a contiguous run of blocks per row covering every step (paged),
sent whole with the new sequence, so decode rows append none and a backend of any
layout can be timed without the router's allocator.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tgi.backend.contract import (
    Backend,
    KvLayout,
    Limits,
    NewSequence,
    RunningSequence,
    StepOutput,
    StepPlan,
)
from tgi.bench.metrics import Distribution
from tgi.bench.results import Environment
from tgi.errors import BackendError

__all__ = [
    "ENGINE_SCHEMA",
    "EngineLevel",
    "EngineParameters",
    "EngineResult",
    "open_backend",
    "run_engine",
]

logger = logging.getLogger(__name__)

ENGINE_SCHEMA = "tgi-bench-engine/1"


@dataclass(frozen=True, slots=True)
class EngineParameters:
    """What to time."""

    batch_sizes: tuple[int, ...]
    input_len: int  # prompt tokens per row
    decode_steps: int  # decode steps after each prefill
    runs: int  # counted repetitions per batch size
    warmup_runs: int  # uncounted repetitions before them
    seed: int


@dataclass(frozen=True, slots=True)
class EngineLevel:
    """Timings of one batch size, in milliseconds, and the throughputs they imply."""

    batch_size: int
    prefill_ms: Distribution  # one sample per run: the whole batch's prefill
    decode_step_ms: Distribution  # one sample per decode step (a token for every row)
    decode_total_ms: Distribution  # one sample per run: all its decode steps
    prefill_tokens_per_s: float  # batch_size * input_len / mean prefill latency
    decode_tokens_per_s: float  # batch_size / mean decode step latency


@dataclass(frozen=True, slots=True)
class EngineResult:
    """A whole `tgi bench engine` run."""

    label: str
    created: str
    command: tuple[str, ...]
    environment: Environment
    backend: str  # the plugin's name
    backend_version: str
    model_id: str
    parameters: EngineParameters
    levels: tuple[EngineLevel, ...]
    schema: str = ENGINE_SCHEMA


def _addressing(backend: Backend, row: int, total_len: int) -> tuple[int | None, tuple[int, ...]]:
    """(slot, block_ids) for row `row` of a batch, as its layout needs."""
    capabilities = backend.capabilities
    if capabilities.kv_layout is KvLayout.SLOTS:
        return row, ()
    if capabilities.kv_layout is KvLayout.PAGED:
        size = capabilities.block_size or 1
        per_row = math.ceil(total_len / size)
        return None, tuple(range(row * per_row, (row + 1) * per_row))
    return None, ()


def _greedy(output: StepOutput) -> list[int]:
    """Each row's token (first-position argmax, or the device's pick): the step's one
    device-to-host copy."""
    if output.token_ids is not None:
        sampled: list[int] = output.token_ids.tolist()  # [R]
        return sampled
    if output.logits is None:
        raise BackendError("the backend returned neither logits nor token ids")
    ids: list[int] = output.logits[:, 0].argmax(dim=-1).tolist()  # [R]
    return ids


@dataclass(slots=True)
class _RunTimes:
    prefill_s: float
    steps_s: list[float]


def _one_run(
    backend: Backend,
    prompts: np.ndarray,
    seq_ids: Sequence[int],
    decode_steps: int,
) -> _RunTimes:
    """Admit `prompts` ([B, L]) in one plan, decode them, release them; time each step."""
    batch_size, input_len = prompts.shape
    total_len = input_len + decode_steps + 1
    addresses = [_addressing(backend, b, total_len) for b in range(batch_size)]
    new = tuple(
        NewSequence(seq_id, tuple(prompts[b].tolist()), slot=slot, block_ids=blocks)
        for b, (seq_id, (slot, blocks)) in enumerate(zip(seq_ids, addresses, strict=True))
    )
    steps: list[float] = []
    try:
        started = time.perf_counter()
        tokens = _greedy(backend.step(StepPlan(new=new)))
        prefill_s = time.perf_counter() - started
        for step in range(decode_steps):
            plan = StepPlan(
                running=tuple(
                    RunningSequence(seq_id, input_len + step, decode=True, last_token=token)
                    for seq_id, token in zip(seq_ids, tokens, strict=True)
                ),
                step_index=step + 1,
            )
            started = time.perf_counter()
            tokens = _greedy(backend.step(plan))
            steps.append(time.perf_counter() - started)
    finally:
        backend.release(list(seq_ids))
    return _RunTimes(prefill_s, steps)


def run_engine(
    backend: Backend,
    parameters: EngineParameters,
    vocab_size: int,
    *,
    on_run: Callable[[int, int], Any] | None = None,
) -> list[EngineLevel]:
    """Time every batch size of `parameters` on a warmed-up `backend`.

    `on_run(batch_size, run)` is called after each run, warm-up runs included (runs
    numbered from 0 across both), for progress display.
    """
    if parameters.runs < 1 or parameters.decode_steps < 1 or parameters.input_len < 1:
        raise ValueError("runs, decode steps and input length must be at least 1")
    rng = np.random.default_rng(parameters.seed)
    next_id = itertools.count()
    levels = []
    for batch_size in parameters.batch_sizes:
        counted: list[_RunTimes] = []
        for run in range(parameters.warmup_runs + parameters.runs):
            prompts = rng.integers(0, vocab_size, size=(batch_size, parameters.input_len))
            seq_ids = [next(next_id) for _ in range(batch_size)]
            times = _one_run(backend, prompts, seq_ids, parameters.decode_steps)
            if run >= parameters.warmup_runs:
                counted.append(times)
            if on_run is not None:
                on_run(batch_size, run)
        levels.append(_level(batch_size, parameters.input_len, counted))
        logger.info(
            "batch %d: prefill p50 %.1f ms, decode step p50 %.1f ms",
            batch_size,
            levels[-1].prefill_ms.p50,
            levels[-1].decode_step_ms.p50,
        )
    return levels


def _level(batch_size: int, input_len: int, runs: Sequence[_RunTimes]) -> EngineLevel:
    prefill = Distribution.from_seconds([r.prefill_s for r in runs])
    steps = Distribution.from_seconds([s for r in runs for s in r.steps_s])
    totals = Distribution.from_seconds([sum(r.steps_s) for r in runs])
    if prefill is None or steps is None or totals is None:
        raise ValueError("no counted runs")
    return EngineLevel(
        batch_size=batch_size,
        prefill_ms=prefill,
        decode_step_ms=steps,
        decode_total_ms=totals,
        prefill_tokens_per_s=batch_size * input_len / (prefill.mean / 1000.0),
        decode_tokens_per_s=batch_size / (steps.mean / 1000.0),
    )


def open_backend(
    model_id: str | None, backend: str | None, dtype: str | None, parameters: EngineParameters
) -> tuple[Backend, str, str, str, int]:
    """Select, create and warm up a backend the way `tgi serve` does, sized for the run."""
    from tgi.config import resolve_config, snapshot_environ
    from tgi.launcher import prepare
    from tgi.models.source import read_model_config

    largest = max(parameters.batch_sizes)
    total = parameters.input_len + parameters.decode_steps + 1
    values = {
        "model_id": model_id,
        "backend": backend,
        "dtype": dtype,
        "max_input_tokens": parameters.input_len,
        "max_total_tokens": total,
        "max_batch_prefill_tokens": largest * parameters.input_len,
        "max_batch_size": largest,
    }
    config = resolve_config(values, snapshot_environ())
    prepared = prepare(config)
    config = prepared.config
    created = prepared.selected.create_backend(config, prepared.model)
    if config.max_input_tokens is None or config.max_total_tokens is None:
        raise BackendError("token limits were not derived")
    created.warmup(
        Limits(
            max_input_tokens=config.max_input_tokens,
            max_total_tokens=config.max_total_tokens,
            max_batch_prefill_tokens=config.max_batch_prefill_tokens or total,
            max_batch_total_tokens=config.max_batch_total_tokens,
            max_batch_size=config.max_batch_size,
        )
    )
    probe = prepared.selected.record.probe
    vocab = int(read_model_config(prepared.model.path).get("vocab_size", 0))
    if vocab < 1:
        raise BackendError("the model's config.json has no vocab_size")
    return (
        created,
        prepared.selected.name,
        probe.version if probe else "unknown",
        prepared.model.model_id,
        vocab,
    )
