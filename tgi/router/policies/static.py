"""Static slots: a backend compiled for B sequences of at most L tokens each.

NOTE: the invariants this policy and the scheduler keep together:

- a running sequence owns exactly one slot in [0, B) from its prefill until its
  release is handed to the engine; no slot is ever owned twice;
- admission never takes more rows than free slots, so the backend never sees more than
  B rows, and validation (max_total_tokens <= L) means no row outgrows its slot;
- where the backend says `prefill_rebuilds_cache` (compiled without continuous
  batching), every prefill rewrites the KV of the whole batch: the scheduler re-sends
  each running sequence's history as a rebuild row, and its pending token (sampled but
  not yet in KV) is fed by the next decode as usual:

      prompt           generated         rebuild row = prompt + generated[:-1]
      [p0 p1 ... pn-1] [g0 g1 ... gk-1]  decode row  = (gk-1,) at position n + k - 1
                                 ^ pending

  so a sequence's tokens do not depend on who joined the batch mid-stream.

Admission is first come, first served, as in the continuous policy. A rebuild costs a
prefill of every running slot, so in rebuild mode newcomers wait for TGI's
`waiting_served_ratio` / `max_waiting_tokens` rule; in insert mode (continuous
batching) only the new rows are written, and they join at the next step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tgi.backend.contract import Batching, Capabilities
from tgi.router.policies.base import Admission, Budget, Candidate

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


@dataclass(slots=True)
class StaticSlotsPolicy:
    """Admit waiting requests into the free slots of a static-shape backend."""

    num_slots: int  # B: compiled batch size
    max_length: int  # L: compiled sequence length; no sequence may outgrow it
    rebuild: bool  # every prefill re-sends each running sequence's history
    waiting_served_ratio: float
    max_waiting_tokens: int
    slots: SlotTable = field(init=False)

    def __post_init__(self) -> None:
        if self.num_slots <= 0 or self.max_length <= 0:
            raise ValueError("a static policy needs a positive slot count and length")
        self.slots = SlotTable(self.num_slots)

    @classmethod
    def from_capabilities(
        cls, capabilities: Capabilities, *, waiting_served_ratio: float, max_waiting_tokens: int
    ) -> StaticSlotsPolicy:
        """The policy for a backend whose `batching` is STATIC; ValueError otherwise."""
        size, length = capabilities.static_batch_size, capabilities.static_max_length
        if capabilities.batching is not Batching.STATIC or not size or not length:
            raise ValueError(
                "static slots need batching=STATIC with static_batch_size and "
                f"static_max_length; the backend says {capabilities}"
            )
        return cls(
            num_slots=size,
            max_length=length,
            rebuild=capabilities.prefill_rebuilds_cache,
            waiting_served_ratio=waiting_served_ratio,
            max_waiting_tokens=max_waiting_tokens,
        )

    def admit(self, waiting: Sequence[Candidate], budget: Budget) -> Admission:
        """First come, first served into free slots, within the token budgets."""
        room_rows = self.slots.num_free
        if budget.max_batch_size is not None:
            room_rows = min(room_rows, budget.max_batch_size - budget.running)
        if not waiting or room_rows <= 0:
            return Admission(())
        token_room = budget.max_batch_total_tokens - budget.reserved_tokens
        prefill_room = budget.max_batch_prefill_tokens
        admitted: list[int] = []
        for candidate in waiting:
            if len(admitted) >= room_rows:
                break
            if candidate.max_total_tokens > token_room:
                break
            # The first prompt always runs (validation bounded it by max_input_tokens).
            if admitted and candidate.input_tokens > prefill_room:
                break
            admitted.append(candidate.seq_id)
            token_room -= candidate.max_total_tokens
            prefill_room -= candidate.input_tokens
        if admitted and budget.running and not self._may_pause(len(admitted), budget):
            return Admission(())
        return Admission(tuple(admitted))

    def _may_pause(self, num_admitted: int, budget: Budget) -> bool:
        """Insert mode never pauses anyone; rebuild mode follows TGI's rule."""
        if not self.rebuild or budget.steps_since_prefill >= self.max_waiting_tokens:
            return True
        return num_admitted >= int(budget.running * self.waiting_served_ratio)
