"""Load levels: when each request is sent, and how many may be in flight at once.

NOTE: a level is (request rate, max concurrency), as in vLLM's `benchmark_serving`:

- arrivals: request i is released at `offsets[i]` seconds after the level starts; the
  gaps are gamma(shape=burstiness, scale=1 / (rate * burstiness)), which is a Poisson
  process for burstiness 1, burstier below 1 and more regular above; an infinite rate
  releases every request at once;
- a released request then waits for one of `max_concurrency` slots (no cap when None),
  so a "concurrency sweep" is an infinite rate with caps of 1, 8, 32, ...;
- offsets are absolute, not slept one after the other, so slow sends never stretch the
  schedule.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tgi.bench.client import StreamClient
from tgi.bench.records import BenchRequest, RequestOutcome

__all__ = ["Level", "LevelRun", "arrival_offsets", "run_level", "warm_up"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Level:
    """One load point of a run."""

    request_rate: float  # requests per second; math.inf: all at once
    max_concurrency: int | None  # requests in flight at most; None: no cap
    num_requests: int

    @property
    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        cap = "none" if self.max_concurrency is None else str(self.max_concurrency)
        return f"rate={rate} concurrency={cap}"


@dataclass(slots=True)
class LevelRun:
    """The raw outcome of one level: per-request records and the wall time they took."""

    level: Level
    outcomes: list[RequestOutcome]  # in dataset order
    duration_s: float  # first send to last completion


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float, seed: int
) -> np.ndarray:
    """Send times in seconds after the level starts, non-decreasing; the first is 0.

    `[num_requests]` float64. Gaps are gamma(burstiness, 1 / (rate * burstiness)): mean
    1 / rate, coefficient of variation 1 / sqrt(burstiness).
    """
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate) or num_requests == 0:
        return np.zeros(num_requests)
    rng = np.random.default_rng(seed)
    theta = 1.0 / (request_rate * burstiness)
    gaps = rng.gamma(shape=burstiness, scale=theta, size=num_requests - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


async def run_level(
    client: StreamClient,
    requests: Sequence[BenchRequest],
    level: Level,
    *,
    burstiness: float = 1.0,
    seed: int = 0,
    on_done: Callable[[RequestOutcome], None] | None = None,
) -> LevelRun:
    """Send `requests` at `level`; return once every one has succeeded or failed."""
    offsets = arrival_offsets(len(requests), level.request_rate, burstiness, seed)
    slots = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None
    start = time.perf_counter()

    async def one(index: int, request: BenchRequest) -> RequestOutcome:
        delay = start + float(offsets[index]) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            outcome = await client.send(request, index=index, level_start=start)
        else:
            async with slots:
                outcome = await client.send(request, index=index, level_start=start)
        if on_done is not None:
            on_done(outcome)
        return outcome

    outcomes = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    duration = time.perf_counter() - start
    logger.info(
        "%s: %d requests in %.2f s, %d failed",
        level.label,
        len(outcomes),
        duration,
        sum(not o.success for o in outcomes),
    )
    return LevelRun(level, list(outcomes), duration)


async def warm_up(
    client: StreamClient, requests: Sequence[BenchRequest], concurrency: int
) -> list[RequestOutcome]:
    """Send `requests` (not counted anywhere) so caches, pools and JITs are warm."""
    if not requests:
        return []
    run = await run_level(
        client,
        requests,
        Level(math.inf, max(1, concurrency), len(requests)),
    )
    failed = [o for o in run.outcomes if not o.success]
    if failed:
        logger.warning(
            "%d of %d warm-up requests failed, e.g. %s",
            len(failed),
            len(run.outcomes),
            failed[0].error,
        )
    return run.outcomes
