"""What a batching policy sees and decides; the scheduler owns everything else."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Admission", "BatchingPolicy", "Budget", "Candidate"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A waiting request, as far as admission cares."""

    seq_id: int
    input_tokens: int
    max_total_tokens: int  # input + max_new_tokens: the KV it may grow to


@dataclass(frozen=True, slots=True)
class Budget:
    """The room left in the running batch this step."""

    running: int  # rows in the running batch
    reserved_tokens: int  # sum of max_total_tokens over running rows
    max_batch_total_tokens: int  # KV tokens the backend can hold (warmup)
    max_batch_prefill_tokens: int  # prompt tokens one prefill may run
    max_batch_size: int | None  # rows; None: no cap
    steps_since_prefill: int  # decode steps since new rows last joined


@dataclass(frozen=True, slots=True)
class Admission:
    seq_ids: tuple[int, ...]  # admitted, in arrival order


class BatchingPolicy(Protocol):
    def admit(self, waiting: Sequence[Candidate], budget: Budget) -> Admission:
        """Pick the waiting requests to prefill now; `waiting` is in arrival order."""
        ...
