"""Continuous batching: new requests join a running batch between decode steps.

NOTE: admission is first come, first served: it stops at the first request that does
not fit, so a long prompt is not starved by short ones behind it. TGI's
`waiting_served_ratio` / `max_waiting_tokens` apply where a prefill pauses the whole
batch to re-shape it (padded and bucketed backends): there, new rows join only when
waiting >= running x ratio, or after `max_waiting_tokens` steps. Where a prefill costs
the running rows nothing but its own time (per-row KV, chunked prefill) nothing is
gained by waiting, and new rows join at the very next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tgi.router.policies.base import Admission, Budget, Candidate

__all__ = ["ContinuousPolicy"]


@dataclass(frozen=True, slots=True)
class ContinuousPolicy:
    waiting_served_ratio: float
    max_waiting_tokens: int
    join_immediately: bool  # the backend's prefill does not pause running rows

    def admit(self, waiting: Sequence[Candidate], budget: Budget) -> Admission:
        if not waiting:
            return Admission(())
        room_rows = None
        if budget.max_batch_size is not None:
            room_rows = budget.max_batch_size - budget.running
            if room_rows <= 0:
                return Admission(())
        token_room = budget.max_batch_total_tokens - budget.reserved_tokens
        prefill_room = budget.max_batch_prefill_tokens
        admitted: list[int] = []
        for candidate in waiting:
            if room_rows is not None and len(admitted) >= room_rows:
                break
            if candidate.max_total_tokens > token_room:
                break
            # The first prompt of a step always runs, even one above the prefill budget
            # (validation already bounded it by max_input_tokens).
            if admitted and candidate.input_tokens > prefill_room:
                break
            admitted.append(candidate.seq_id)
            token_room -= candidate.max_total_tokens
            prefill_room -= candidate.input_tokens
        if budget.running and not self._may_pause(len(admitted), budget):
            return Admission(())
        return Admission(tuple(admitted))

    def _may_pause(self, num_admitted: int, budget: Budget) -> bool:
        """TGI's rule for pausing a running batch to prefill newcomers."""
        if self.join_immediately or budget.steps_since_prefill >= self.max_waiting_tokens:
            return True
        return num_admitted >= int(budget.running * self.waiting_served_ratio)
