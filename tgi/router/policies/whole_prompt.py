"""What the continuous and static-slots policies share: whole prompts, one token a step.

NOTE: under these policies a new sequence's prompt is computed whole in its first step
(a NewSequence; a recomputed one sends `prompt + generated[:-1]`), and every running
sequence decodes one token per step. Admission is first come, first served against the
KV, prefill and row budgets, a prompt counted at its padded length (`StepConstraints`);
a subclass says how many rows may join (`_room_rows`), whether admitting pauses the
running batch (`_pauses_running`) and what a new row carries besides its tokens
(`_new_row`: a slot).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

from tgi.backend.contract import NewSequence, StepPlan
from tgi.engine.results import StepResult
from tgi.router.policies.base import (
    Admission,
    Budget,
    Candidate,
    PolicyLimits,
    Schedule,
    admit_in_order,
    decode_row,
    fits_longest_chunk,
    may_pause,
    new_row,
)
from tgi.router.sequence import SequenceState

__all__ = ["WholePromptPolicy"]


class WholePromptPolicy:
    """Base of `ContinuousPolicy` and `StaticSlotsPolicy` (a `SchedulingPolicy`)."""

    def __init__(self, limits: PolicyLimits) -> None:
        self.limits = limits
        self._steps_since_prefill = 0

    # ---- what subclasses decide ------------------------------------------------------

    def _room_rows(self, budget: Budget) -> int | None:
        """Rows that may join this step; None: no cap beyond the budgets."""
        if budget.max_batch_size is None:
            return None
        return budget.max_batch_size - budget.running

    def _pauses_running(self) -> bool:
        """Whether a newcomer's prefill pauses the running rows (TGI's rule applies)."""
        return True

    def _new_row(self, sequence: SequenceState) -> NewSequence:
        return new_row(sequence)

    # ---- SchedulingPolicy ------------------------------------------------------------

    def schedule(
        self, running: Sequence[SequenceState], waiting: Sequence[SequenceState]
    ) -> Schedule:
        step = Schedule(running=[decode_row(seq) for seq in running if seq.needs_rows])
        step.admitted = self._admit(running, waiting)
        step.new = [self._new_row(sequence) for sequence in step.admitted]
        self._steps_since_prefill = 0 if step.admitted else self._steps_since_prefill + 1
        return step

    def admit(self, waiting: Sequence[Candidate], budget: Budget) -> Admission:
        """Which waiting requests join now: first come, first served within the
        budgets, and where joining pauses the running batch, only when TGI's rule
        allows it."""
        room_rows = self._room_rows(budget)
        if not waiting or (room_rows is not None and room_rows <= 0):
            return Admission(())
        chosen = admit_in_order(waiting, budget, room_rows)
        if chosen and budget.running and self._pauses_running():
            pause_ok = may_pause(
                len(chosen),
                budget,
                ratio=self.limits.waiting_served_ratio,
                max_waiting_tokens=self.limits.max_waiting_tokens,
            )
            if not pause_ok:
                return Admission(())
        return Admission(tuple(chosen))

    def after_step(self, plan: StepPlan, result: StepResult) -> None:
        """Nothing to record: the backend keeps each sequence's KV itself."""

    def free(self, seq_ids: Iterable[int]) -> None:
        """Nothing is owned here beyond the running set the router keeps."""

    def retain(self, seq_ids: Iterable[int]) -> list[int]:
        return []

    def reset(self) -> None:
        self._steps_since_prefill = 0

    def reserved_tokens(self, running: Sequence[SequenceState]) -> int:
        return sum(sequence.max_total_tokens for sequence in running)

    def block_usage(self) -> tuple[int, int] | None:
        return None

    def can_recompute(self, sequence: SequenceState) -> bool:
        return fits_longest_chunk(self.limits, sequence)

    def may_plan_ahead(self, running: Sequence[SequenceState]) -> bool:
        return True  # nothing is ever preempted, and decode rows need no token value

    # ---- internals -------------------------------------------------------------------

    def _admit(
        self, running: Sequence[SequenceState], waiting: Sequence[SequenceState]
    ) -> list[SequenceState]:
        if not waiting:
            return []
        limits = self.limits
        budget = Budget(
            running=len(running),
            reserved_tokens=self.reserved_tokens(running),
            max_batch_total_tokens=limits.max_batch_total_tokens,
            max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
            max_batch_size=limits.max_rows,
            steps_since_prefill=self._steps_since_prefill,
        )
        room = self._room_rows(budget)
        if room is not None and room <= 0:  # full: no candidate list to build
            return []
        pad = limits.constraints.padded_length
        candidates = [
            Candidate(seq.seq_id, pad(seq.num_computed), seq.max_total_tokens) for seq in waiting
        ]
        chosen = self.admit(candidates, budget).seq_ids
        return list(islice(waiting, len(chosen)))
