"""The one interface the router asks each step: `SchedulingPolicy`.

NOTE: a policy owns everything about WHERE sequences live in the backend: which of them
run this step and with which tokens, their slots or KV blocks, and how much room is
left. The router owns everything else (the queue, streaming, stop criteria,
cancellation). Per step the router calls

    schedule(running, waiting)  -> Schedule (rows of the plan, admitted, preempted)
    after_step(plan, result)    -> bookkeeping once the step ran (prefix-cache keys)
    free(seq_ids)               -> the sequences ended: their slots/blocks are free

and `retain`/`reset` when the backend's state and the policy's must be made to agree
again (reconciliation, a restarted engine). The continuous, static-slots and paged
policies implement it; a backend may bring its own through the
`tgi_scheduling_policy` hook.

Admission in every built-in policy is first come, first served: it stops at the first
request that does not fit, so a long prompt is not starved by short ones behind it, and
what it admits is always a prefix of the waiting queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tgi.backend.contract import NewSequence, RunningSequence, StepConstraints, StepPlan
from tgi.engine.results import StepResult
from tgi.router.sequence import SequenceState

__all__ = [
    "Admission",
    "Budget",
    "Candidate",
    "PolicyLimits",
    "Schedule",
    "SchedulingPolicy",
    "admit_in_order",
    "decode_row",
    "fits_longest_chunk",
    "may_pause",
    "new_row",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyLimits:
    """The budgets a policy plans within; fixed once the server has warmed up."""

    max_batch_prefill_tokens: int  # prompt tokens computed in one step
    max_batch_total_tokens: int  # KV tokens the backend can hold (warmup, or the flag)
    max_batch_size: int | None  # rows in one step; None: no cap
    waiting_served_ratio: float = 1.2  # TGI: pause a running batch only for this many
    max_waiting_tokens: int = 20  # ... or after this many steps
    constraints: StepConstraints = field(default_factory=StepConstraints)

    @property
    def max_rows(self) -> int | None:
        """Rows one step may hold: the flag and the backend's hard shapes."""
        caps = [c for c in (self.max_batch_size, self.constraints.max_rows) if c]
        return min(caps) if caps else None


@dataclass(slots=True)
class Schedule:
    """What one step runs, as a policy decided it."""

    new: list[NewSequence] = field(default_factory=list)
    running: list[RunningSequence] = field(default_factory=list)
    admitted: list[SequenceState] = field(default_factory=list)  # a prefix of the queue
    preempted: list[SequenceState] = field(default_factory=list)  # latest admitted first
    hit_tokens: int = 0  # prefix cache: prompt tokens found cached
    queried_tokens: int = 0  # ... of the prompt tokens looked up


@runtime_checkable
class SchedulingPolicy(Protocol):
    """Plans every step of one backend; see the module NOTE."""

    def schedule(
        self, running: Sequence[SequenceState], waiting: Sequence[SequenceState]
    ) -> Schedule:
        """Rows for the next step. `running` is in admission order, `waiting` in queue
        order (preempted sequences at its front). Mutates the policy's ownership state;
        the router moves `admitted` and `preempted` between its queue and batch."""
        ...

    def after_step(self, plan: StepPlan, result: StepResult) -> None:
        """The step ran (rows in `result.errors` failed and will be freed)."""
        ...

    def free(self, seq_ids: Iterable[int]) -> None:
        """The sequences ended or were preempted: what they owned is free again."""
        ...

    def retain(self, seq_ids: Iterable[int]) -> list[int]:
        """Free what is owned by sequences outside `seq_ids`; return those owners."""
        ...

    def reset(self) -> None:
        """Forget every sequence and cached prefix (the backend's KV is gone)."""
        ...

    def reserved_tokens(self, running: Sequence[SequenceState]) -> int:
        """KV tokens the running batch holds or is promised (for /info and metrics)."""
        ...

    def block_usage(self) -> tuple[int, int] | None:
        """(used, free) KV blocks where the policy owns blocks, else None."""
        ...

    def can_recompute(self, sequence: SequenceState) -> bool:
        """Whether the sequence could be prefilled again from its tokens (after a failed
        step dropped its KV): a backend that cannot split prompts has a longest chunk."""
        ...

    def may_plan_ahead(self, running: Sequence[SequenceState]) -> bool:
        """Whether the next step can be planned before the current one's tokens are
        known: it must need no token values (no drafts) and can preempt no one."""
        ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """A waiting request, as far as admission cares."""

    seq_id: int
    input_tokens: int  # its first chunk, padded to the backend's length bucket
    max_total_tokens: int  # input + max_new_tokens: the KV it may grow to


@dataclass(frozen=True, slots=True)
class Budget:
    """The room left in the running batch this step."""

    running: int  # rows in the running batch
    reserved_tokens: int  # sum of max_total_tokens over running rows
    max_batch_total_tokens: int  # KV tokens the backend can hold (warmup)
    max_batch_prefill_tokens: int  # prompt tokens one prefill may run
    max_batch_size: int | None  # rows; None: no cap
    steps_since_prefill: int  # steps since new rows last joined


@dataclass(frozen=True, slots=True)
class Admission:
    seq_ids: tuple[int, ...]  # admitted, in arrival order


def admit_in_order(
    waiting: Sequence[Candidate], budget: Budget, room_rows: int | None
) -> list[int]:
    """First come, first served within the KV, prefill and row budgets."""
    if room_rows is not None and room_rows <= 0:
        return []
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
    return admitted


def may_pause(num_admitted: int, budget: Budget, *, ratio: float, max_waiting_tokens: int) -> bool:
    """TGI's rule for pausing a running batch to prefill newcomers."""
    if budget.steps_since_prefill >= max_waiting_tokens:
        return True
    return num_admitted >= int(budget.running * ratio)


def new_row(
    sequence: SequenceState,
    *,
    token_ids: tuple[int, ...] | None = None,
    start_position: int = 0,
    block_ids: tuple[int, ...] = (),
    slot: int | None = None,
    want_logits: bool = True,
) -> NewSequence:
    """The NewSequence row of a sequence the backend does not hold yet. A sequence that
    already generated tokens (recomputed after a preemption or a failed step) sends
    `prompt + generated[:-1]` and asks for no logits: its pending token is fed by its
    next decode row, as if nothing had happened."""
    request = sequence.request
    if token_ids is None:
        token_ids = sequence.recompute_tokens
    if sequence.tokens:
        want_logits = False
    return NewSequence(
        seq_id=sequence.seq_id,
        token_ids=token_ids,
        start_position=start_position,
        block_ids=block_ids,
        slot=slot,
        want_logits=want_logits,
        want_prompt_logits=want_logits and start_position == 0 and request.decoder_input_details,
        sampling=request.sampling,
    )


def fits_longest_chunk(limits: PolicyLimits, sequence: SequenceState) -> bool:
    """Whether the sequence's tokens fit the backend's longest chunk in one piece (what
    a recompute of it needs where prompts are not split)."""
    longest = limits.constraints.max_chunk
    return longest is None or sequence.num_computed <= longest


def decode_row(
    sequence: SequenceState,
    *,
    drafts: tuple[int, ...] = (),
    new_block_ids: tuple[int, ...] = (),
) -> RunningSequence:
    """A decode row: feed the pending token (and any drafts) at the next position."""
    return RunningSequence(
        seq_id=sequence.seq_id,
        start_position=sequence.next_position,
        token_ids=drafts,
        decode=True,
        # None while the previous step is in flight: the engine feeds what it sampled
        last_token=sequence.tokens[-1].id if not sequence.in_flight else None,
        new_block_ids=new_block_ids,
    )
