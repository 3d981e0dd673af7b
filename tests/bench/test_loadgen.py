"""Arrival schedules and concurrency caps."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from tgi.bench.loadgen import Level, arrival_offsets, run_level
from tgi.bench.records import BenchRequest, RequestOutcome
from tgi.bench.serve import build_levels


def test_poisson_gaps_have_the_rate_and_unit_variation() -> None:
    offsets = arrival_offsets(20_001, request_rate=10.0, burstiness=1.0, seed=7)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)  # exponential: CV 1
    # memoryless: P(gap > mean) = exp(-1)
    assert (gaps > 0.1).mean() == pytest.approx(math.exp(-1), abs=0.015)


def test_burstiness_changes_variation_not_rate() -> None:
    regular = np.diff(arrival_offsets(20_001, 10.0, burstiness=4.0, seed=1))
    bursty = np.diff(arrival_offsets(20_001, 10.0, burstiness=0.25, seed=1))
    assert regular.mean() == pytest.approx(0.1, rel=0.03)
    assert bursty.mean() == pytest.approx(0.1, rel=0.06)
    assert regular.std() / regular.mean() == pytest.approx(0.5, rel=0.05)  # 1 / sqrt(4)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # 1 / sqrt(0.25)


def test_arrivals_are_seeded_and_infinite_rate_is_all_at_once() -> None:
    a = arrival_offsets(50, 3.0, 1.0, seed=42)
    assert np.array_equal(a, arrival_offsets(50, 3.0, 1.0, seed=42))
    assert not np.array_equal(a, arrival_offsets(50, 3.0, 1.0, seed=43))
    assert np.array_equal(arrival_offsets(5, math.inf, 1.0, seed=0), np.zeros(5))
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0, 1.0, seed=0)


class _CountingClient:
    """Stands in for StreamClient: takes `hold_s` per request, tracks requests in flight."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.in_flight = 0
        self.most_in_flight = 0

    async def send(
        self, request: BenchRequest, *, index: int = 0, level_start: float | None = None
    ) -> RequestOutcome:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(self.hold_s)
        self.in_flight -= 1
        outcome = RequestOutcome(index, request.prompt_len, request.output_len, success=True)
        outcome.start_s = start
        return outcome


async def test_concurrency_cap_is_respected() -> None:
    client = _CountingClient(hold_s=0.02)
    requests = [BenchRequest("p", 1, 1)] * 12
    done: list[int] = []
    run = await run_level(
        client,  # type: ignore[arg-type]
        requests,
        Level(math.inf, 3, 12),
        on_done=lambda o: done.append(o.index),
    )
    assert client.most_in_flight == 3
    assert sorted(done) == list(range(12))
    assert [o.index for o in run.outcomes] == list(range(12))
    assert run.duration_s >= 4 * 0.02  # 12 requests, 3 at a time


async def test_rate_mode_follows_the_schedule() -> None:
    client = _CountingClient(hold_s=0.0)
    requests = [BenchRequest("p", 1, 1)] * 8
    run = await run_level(
        client,  # type: ignore[arg-type]
        requests,
        Level(40.0, None, 8),
        seed=3,
    )
    expected = arrival_offsets(8, 40.0, 1.0, seed=3)
    sent = np.array([o.start_s for o in run.outcomes])
    sent -= sent[0]
    assert np.all(sent >= expected - 0.002)
    assert np.all(sent <= expected + 0.05)  # loop scheduling only ever delays


def test_levels_from_flags() -> None:
    levels = build_levels([1, 8], [math.inf], None, [4, 16])
    assert [(lv.max_concurrency, lv.num_requests) for lv in levels] == [(1, 4), (8, 16)]
    rates = build_levels([], [2.0, 4.0], 16, [10])
    assert [(lv.request_rate, lv.max_concurrency, lv.num_requests) for lv in rates] == [
        (2.0, 16, 10),
        (4.0, 16, 10),
    ]
    with pytest.raises(ValueError):
        build_levels([1, 8, 32], [math.inf], None, [4, 16])
