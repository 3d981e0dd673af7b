"""Rank 0 repeats every state-changing backend call to the other ranks, once and in order;
a follower runs them, and a call that fails on it alone ends it (RankFailed)."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from tgi.backend import wire
from tgi.backend.contract import Limits, NewSequence, StepPlan
from tgi.engine.worker.messages import Query, Release
from tgi.parallel.ranks import LeaderBackend, RankFailed, follow
from tgi.testing.fake_backend import FakeBackend

LIMITS = Limits(16, 32, 64, max_batch_total_tokens=None, max_batch_size=None)


class LoopbackGroup:
    """A `ShardGroup` stand-in: rank 0's broadcasts land in a queue rank r reads."""

    def __init__(self, rank: int, queue: deque[bytes]) -> None:
        self.rank, self.world_size, self.queue, self.broken = rank, 2, queue, None

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        if payload is not None:
            self.queue.append(payload)
            return payload
        return self.queue.popleft()


def test_the_leader_broadcasts_each_call_before_running_it_and_the_follower_mirrors() -> None:
    queue: deque[bytes] = deque()
    leader_backend, follower_backend = FakeBackend(), FakeBackend()
    leader = LeaderBackend(leader_backend, LoopbackGroup(0, queue))  # type: ignore[arg-type]
    leader.warmup(LIMITS)
    leader.step(StepPlan(new=(NewSequence(1, (5, 6, 7)),)))
    leader.kv_usage()  # local: every rank holds the same sequences
    leader.health()
    leader.release([1])
    leader.close()
    sent = [wire.decode_any(raw, (StepPlan, Limits, Release, Query)) for raw in queue]
    assert [type(call).__name__ for call in sent] == [
        "Limits",
        "StepPlan",
        "Query",
        "Release",
        "Query",
    ]
    assert sent[-1] == Query("shutdown")
    follow(follower_backend, LoopbackGroup(1, queue))  # type: ignore[arg-type]
    assert follower_backend.kv_usage() == leader_backend.kv_usage()
    assert not queue


def test_a_call_that_fails_on_a_follower_alone_ends_it() -> None:
    queue: deque[bytes] = deque(
        [wire.encode(StepPlan(new=(NewSequence(1, (5,)),))), wire.encode(Query("shutdown"))]
    )

    class Broken(FakeBackend):
        def step(self, plan: StepPlan) -> Any:
            raise RuntimeError("out of memory on this rank")

    with pytest.raises(RankFailed, match="rank 1: StepPlan failed: out of memory"):
        follow(Broken(), LoopbackGroup(1, queue))  # type: ignore[arg-type]
