"""Static slots: a backend compiled for B sequences of at most L tokens each (Neuron).

NOTE: the invariants this policy keeps:

- a running sequence owns exactly one slot in [0, B) from its admission until it is
  freed; no slot is ever owned twice, and the backend never chooses one;
- admission never takes more rows than free slots, so the backend never sees more than
  B rows, and validation (max_total_tokens <= L) means no row outgrows its slot;
- where the backend says `prefill_rebuilds_cache` (compiled without continuous
  batching), each new sequence makes the backend rewrite the KV of every live slot
  (it does so itself, from the tokens it was fed), so newcomers wait for TGI's
  `waiting_served_ratio` / `max_waiting_tokens` rule; in insert mode only the new
  rows are written, and they join at the next step.

Admission is first come, first served, as in the continuous policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tgi.backend.contract import Batching, Capabilities, NewSequence
from tgi.router.policies.base import Budget, PolicyLimits, new_row
from tgi.router.policies.whole_prompt import WholePromptPolicy
from tgi.router.sequence import SequenceState

__all__ = ["SlotTable", "StaticSlotsPolicy"]


@dataclass(slots=True)
class SlotTable:
    """Which slot each running sequence owns; lowest free slot first."""

    num_slots: int
    _slot_of: dict[int, int] = field(default_factory=dict)  # seq_id -> slot

    @property
    def num_free(self) -> int:
        return self.num_slots - len(self._slot_of)

    @property
    def assignment(self) -> Mapping[int, int]:
        """seq_id -> slot of every sequence that owns one (a read-only view)."""
        return self._slot_of

    def take(self, seq_id: int) -> int:
        """Give `seq_id` the lowest free slot; raises when it has one or none is free."""
        if seq_id in self._slot_of:
            raise ValueError(f"seq {seq_id} already owns slot {self._slot_of[seq_id]}")
        used = set(self._slot_of.values())
        for slot in range(self.num_slots):
            if slot not in used:
                self._slot_of[seq_id] = slot
                return slot
        raise ValueError(f"all {self.num_slots} slots are taken; seq {seq_id} cannot get one")

    def free(self, seq_ids: Iterable[int]) -> None:
        """Give back the slots of `seq_ids`; ids that own none are ignored."""
        for seq_id in seq_ids:
            self._slot_of.pop(seq_id, None)

    def retain(self, seq_ids: Iterable[int]) -> list[int]:
        """Free every slot whose owner is not in `seq_ids`; return those owners."""
        keep = set(seq_ids)
        strays = sorted(seq_id for seq_id in self._slot_of if seq_id not in keep)
        self.free(strays)
        return strays


class StaticSlotsPolicy(WholePromptPolicy):
    """`SchedulingPolicy` for a static-shape backend: admit into free slots."""

    def __init__(
        self,
        limits: PolicyLimits,
        *,
        num_slots: int,
        max_length: int,
        rebuild: bool,
    ) -> None:
        if num_slots <= 0 or max_length <= 0:
            raise ValueError("a static policy needs a positive slot count and length")
        super().__init__(limits)
        self.num_slots = num_slots  # B: compiled batch size
        self.max_length = max_length  # L: compiled sequence length
        self.rebuild = rebuild  # each admission rewrites every live slot's KV
        self.slots = SlotTable(num_slots)

    @classmethod
    def from_capabilities(
        cls, capabilities: Capabilities, limits: PolicyLimits
    ) -> StaticSlotsPolicy:
        """The policy for a backend whose `batching` is STATIC; ValueError otherwise."""
        size, length = capabilities.static_batch_size, capabilities.static_max_length
        if capabilities.batching is not Batching.STATIC or not size or not length:
            raise ValueError(
                "static slots need batching=STATIC with static_batch_size and "
                f"static_max_length; the backend says {capabilities}"
            )
        return cls(
            limits,
            num_slots=size,
            max_length=length,
            rebuild=capabilities.prefill_rebuilds_cache,
        )

    def _room_rows(self, budget: Budget) -> int | None:
        room = super()._room_rows(budget)
        return self.slots.num_free if room is None else min(self.slots.num_free, room)

    def _pauses_running(self) -> bool:
        return self.rebuild  # insert mode writes only the new rows

    def _new_row(self, sequence: SequenceState) -> NewSequence:
        return new_row(sequence, slot=self.slots.take(sequence.seq_id))

    def free(self, seq_ids: Iterable[int]) -> None:
        self.slots.free(seq_ids)

    def retain(self, seq_ids: Iterable[int]) -> list[int]:
        return self.slots.retain(seq_ids)

    def reset(self) -> None:
        super().reset()
        self.slots = SlotTable(self.num_slots)
