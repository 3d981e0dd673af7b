"""Rank 0 leads, the other ranks follow: every backend call runs on every rank, in order.

NOTE: the front process talks to rank 0 alone. Rank 0's engine core holds a
`LeaderBackend`, which broadcasts each call that changes state or runs a forward
(warmup, step, release, health, close) to the other ranks over the rank group before
running it on its own slice; each other rank runs `follow`, a loop that receives the
call and runs it on its slice. The collectives inside the forward (all-reduces, the
logits' all-gather) then meet in the same order on every rank. A step's plan already
carries the tokens rank 0 sampled at the previous step (the engine fills `last_token`
before the backend sees the plan), so the plan broadcast is how sampled ids reach the
other ranks; only rank 0 samples.

    front ── StepPlan ──► rank 0: LeaderBackend.step ── broadcast ──► rank r: follow
                                  forward (all-reduce, all-gather) ◄──►  forward
                          sample, answer the front                     wait for the next
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from tgi.backend import wire
from tgi.backend.contract import (
    Backend,
    Capabilities,
    KVUsage,
    Limits,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.engine.worker.messages import Query, Release
from tgi.parallel.group import PeerLost, ShardGroup

__all__ = ["LeaderBackend", "RankFailed", "follow"]

logger = logging.getLogger(__name__)

_CALLS = (StepPlan, Limits, Release, Query)


class LeaderBackend:
    """Rank 0's backend: each call is broadcast to the other ranks, then run here."""

    def __init__(self, backend: Backend, group: ShardGroup) -> None:
        self.backend = backend
        self.group = group

    def __getattr__(self, name: str) -> Any:  # dtype, device_type, ... for describe_backend
        return getattr(self.backend, name)

    @property
    def capabilities(self) -> Capabilities:
        """The rank's own, less `fed_tokens`: a tensor on rank 0's device does not reach
        the other ranks, so every plan they are told carries its tokens."""
        return dataclasses.replace(self.backend.capabilities, fed_tokens=False)

    def warmup(self, limits: Limits) -> WarmupReport:
        self._tell(limits)
        return self.backend.warmup(limits)

    def step(self, plan: StepPlan) -> StepOutput:
        self._tell(plan)
        return self.backend.step(plan)

    def release(self, seq_ids: Sequence[int]) -> None:
        self._tell(Release(tuple(seq_ids)))
        self.backend.release(seq_ids)

    def kv_usage(self) -> KVUsage:
        return self.backend.kv_usage()  # every rank holds the same sequences

    def health(self) -> None:
        self._tell(Query("health"))
        self.backend.health()

    def close(self) -> None:
        try:
            self._tell(Query("shutdown"))
        except PeerLost:
            logger.warning("closing without the other ranks: they are gone")
        self.backend.close()

    def _tell(self, call: StepPlan | Limits | Release | Query) -> None:
        self.group.broadcast_bytes(wire.encode(call))


class RankFailed(RuntimeError):
    """A call failed on this rank (not rank 0): its state may now differ from rank 0's,
    and rank 0 may wait for it in a collective. The rank must exit; the front process
    then starts every rank again."""


def follow(backend: Backend, group: ShardGroup) -> None:
    """Run rank 0's calls on this rank's backend until it says shutdown.

    Raises `PeerLost` when rank 0 is gone and `RankFailed` when a call fails here (a
    failure on one rank alone would leave the others waiting in a collective).
    """
    while True:
        call = wire.decode_any(group.broadcast_bytes(None), _CALLS)
        if isinstance(call, Query) and call.call == "shutdown":
            backend.close()
            return
        try:
            if isinstance(call, StepPlan):
                backend.step(call)
            elif isinstance(call, Limits):
                backend.warmup(call)
            elif isinstance(call, Release):
                backend.release(call.seq_ids)
            elif isinstance(call, Query) and call.call == "health":
                backend.health()
        except PeerLost:
            raise
        except Exception as exc:
            logger.exception("rank %d: %s failed", group.rank, type(call).__name__)
            raise RankFailed(f"rank {group.rank}: {type(call).__name__} failed: {exc}") from exc
