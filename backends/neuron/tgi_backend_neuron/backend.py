"""The neuron backend: tgi's contract over a static-shape executor of B slots x L tokens.

NOTE: the executor (`SlotExecutor`) is the compiled model: optimum-neuron's
`NeuronModelForCausalLM` on Inferentia2/Trainium (`_optimum.py`), or the CPU emulator
(`_emulator.py`). This class owns the bookkeeping both share, and refuses a step that
breaks static shapes before the executor sees it:

    slot:      0        1        2        3          B = 4 compiled slots
    seq_id:    17       -        9        23         one live sequence per slot
    tokens:    [.....   ]        [..      ]          each <= L (compiled sequence_length)

- prefill rows always start at position 0 (no chunked prefill) and (re)write their
  slot from scratch; a row without `slot` takes the lowest free one;
- where the model was compiled without continuous batching, a prefill rewrites the KV
  of the whole batch, so it must re-send every live sequence (`prefill_rebuilds_cache`);
  the router does, with `want_logits=False` for the rebuilt rows;
- decode feeds one token per row at the position equal to the tokens its slot holds.

A failed executor call leaves the KV of the rows it touched undefined: they are dropped
here and reported through `BackendError`, so `kv_usage()` never lists a broken slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    DecodeBatch,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    PrefillBatch,
    PrefillRow,
    StepOutput,
)
from tgi.errors import BackendError

logger = logging.getLogger(__name__)

__all__ = ["NeuronBackend", "SlotExecutor"]


class SlotExecutor(Protocol):
    """A model compiled for `batch_size` slots of `sequence_length` tokens each.

    Called from one thread. Slots are indices in [0, batch_size); the caller has
    checked every slot, position and length against the compiled shape.
    """

    batch_size: int  # B
    sequence_length: int  # L
    max_context_length: int  # longest row one prefill may carry
    continuous_batching: bool  # False: a prefill rewrites the whole batch's KV
    vocab_size: int
    dtype: torch.dtype
    bytes_per_token: int  # KV bytes one token costs, all layers, keys and values

    def warmup(self, num_tokens: int) -> None:
        """Allocate the KV and run the largest prefill once; leaves every slot empty."""
        ...

    def prefill(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write each slot's KV from position 0 with its tokens; logits [n, V] of the
        last position of each row."""
        ...

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        """Feed one token per slot at `positions`; logits [n, V]."""
        ...

    def clear(self, slots: Sequence[int]) -> None:
        """Forget the KV of `slots`."""
        ...

    def health(self) -> None:
        """A real forward that leaves every slot as it was; raises when it fails."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Live:
    """One live sequence: the slot it owns and the tokens its KV holds."""

    slot: int
    num_tokens: int


class NeuronBackend:
    """`tgi.backend.Backend` with static slots, over a `SlotExecutor`."""

    def __init__(self, executor: SlotExecutor, *, device_type: str) -> None:
        self._executor = executor
        self.device_type = device_type  # what /info reports: "neuron" or "neuron (emulated)"
        self.dtype = executor.dtype
        self._capabilities = Capabilities(
            batching=Batching.STATIC,
            kv_layout=KvLayout.SLOTS,
            static_batch_size=executor.batch_size,
            static_max_length=executor.sequence_length,
            prefill_rebuilds_cache=not executor.continuous_batching,
        )
        self._live: dict[int, _Live] = {}  # seq_id -> its slot and length
        self._capacity: KVCapacity | None = None
        self._closed = False
        self.rebuilt_rows = 0  # rows re-prefilled to rebuild a slot (want_logits=False)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def executor(self) -> SlotExecutor:
        return self._executor

    # -- warmup ---------------------------------------------------------------------------

    def warmup(self, limits: Limits) -> KVCapacity:
        """Check `limits` against the compiled shape, run one prefill, report B x L tokens."""
        self._require_open()
        size, length = self._executor.batch_size, self._executor.sequence_length
        if limits.max_batch_size is not None and limits.max_batch_size > size:
            raise BackendError(
                f"--max-batch-size {limits.max_batch_size} is more than the compiled batch "
                f"size {size}; lower it to at most {size}"
            )
        if limits.max_total_tokens > length:
            raise BackendError(
                f"--max-total-tokens {limits.max_total_tokens} is more than the compiled "
                f"sequence length {length}; lower it to at most {length}"
            )
        if limits.max_input_tokens > self._executor.max_context_length:
            raise BackendError(
                f"--max-input-tokens {limits.max_input_tokens} is more than the compiled "
                f"context length {self._executor.max_context_length}; lower it"
            )
        started = time.perf_counter()
        try:
            self._executor.warmup(limits.max_input_tokens)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"neuron warmup failed: {exc}") from exc
        self._capacity = KVCapacity(
            max_total_tokens=size * length,
            bytes_per_token=self._executor.bytes_per_token,
            max_sequences=size,
        )
        logger.info(
            "neuron warmup (%s): %d slots x %d tokens, %s; %d-token prefill took %.3f s",
            self.device_type,
            size,
            length,
            "continuous batching" if self._executor.continuous_batching else "prefill rebuilds KV",
            limits.max_input_tokens,
            time.perf_counter() - started,
        )
        return self._capacity

    # -- steps ----------------------------------------------------------------------------

    def prefill(self, batch: PrefillBatch) -> StepOutput:
        """(Re)write each row's slot; logits [R, 1, V] for the rows that want them."""
        self._require_warm()
        slots = self._plan_prefill(batch.rows)
        self.rebuilt_rows += sum(1 for row in batch.rows if not row.want_logits)
        try:
            logits = self._executor.prefill(slots, [row.token_ids for row in batch.rows])
        except (RuntimeError, ValueError, IndexError) as exc:
            self._drop([row.seq_id for row in batch.rows])
            self._executor.clear(slots)  # new rows' slots may be half written too
            raise BackendError(f"neuron prefill failed: {exc}") from exc
        for row, slot in zip(batch.rows, slots, strict=True):
            self._live[row.seq_id] = _Live(slot, len(row.token_ids))
        wanted = [i for i, row in enumerate(batch.rows) if row.want_logits]
        seq_ids = tuple(batch.rows[i].seq_id for i in wanted)
        return StepOutput(seq_ids, logits[wanted].unsqueeze(1).float())

    def decode(self, batch: DecodeBatch) -> StepOutput:
        """Feed each row's token at its position; logits [R, 1, V]."""
        self._require_warm()
        length = self._executor.sequence_length
        seen: set[int] = set()
        for row in batch.rows:
            live = self._live.get(row.seq_id)
            if live is None or row.seq_id in seen:
                raise BackendError(
                    f"decode of seq {row.seq_id}, which is not live or is named twice"
                )
            seen.add(row.seq_id)
            if len(row.token_ids) != 1:
                raise BackendError("the neuron backend decodes one token per row (no speculation)")
            self._check_token_ids(row.seq_id, row.token_ids)
            if row.slot is not None and row.slot != live.slot:
                raise BackendError(
                    f"decode of seq {row.seq_id} names slot {row.slot}; it owns {live.slot}"
                )
            if row.position != live.num_tokens:
                raise BackendError(
                    f"decode of seq {row.seq_id} at position {row.position} but its slot holds "
                    f"{live.num_tokens} tokens"
                )
            if row.position >= length:
                raise BackendError(
                    f"seq {row.seq_id} would hold {row.position + 1} tokens, past the compiled "
                    f"sequence length {length}"
                )
        slots = [self._live[row.seq_id].slot for row in batch.rows]
        try:
            logits = self._executor.decode(
                slots,
                [row.token_ids[0] for row in batch.rows],
                [row.position for row in batch.rows],
            )
        except (RuntimeError, ValueError, IndexError) as exc:
            self._drop([row.seq_id for row in batch.rows])
            raise BackendError(f"neuron decode failed: {exc}") from exc
        for row in batch.rows:
            self._live[row.seq_id].num_tokens += 1
        return StepOutput(tuple(row.seq_id for row in batch.rows), logits.unsqueeze(1).float())

    def _plan_prefill(self, rows: Sequence[PrefillRow]) -> list[int]:
        """The slot of each row; BackendError before anything changes if a row cannot run."""
        size = self._executor.batch_size
        seen: set[int] = set()
        claimed: dict[int, int] = {}  # slot -> seq_id, this batch
        for row in rows:
            if row.seq_id in seen:
                raise BackendError(f"prefill names seq {row.seq_id} twice")
            seen.add(row.seq_id)
            self._check_token_ids(row.seq_id, row.token_ids)
            self._check_row_length(row)
        if not self._executor.continuous_batching:
            missing = sorted(set(self._live) - seen)
            if missing:
                raise BackendError(
                    "this model was compiled without continuous batching, so a prefill "
                    f"rewrites every slot: it must re-send the live sequences {missing} too"
                )
        owner = {live.slot: seq_id for seq_id, live in self._live.items()}
        slots: list[int | None] = []
        for row in rows:
            live = self._live.get(row.seq_id)
            slot = row.slot if row.slot is not None else (live.slot if live else None)
            if slot is not None:
                if not 0 <= slot < size:
                    raise BackendError(f"seq {row.seq_id} names slot {slot}, outside [0, {size})")
                holder = claimed.get(slot, owner.get(slot, row.seq_id))
                if holder != row.seq_id:
                    raise BackendError(f"seq {row.seq_id} names slot {slot}, held by seq {holder}")
                if live is not None and live.slot != slot:
                    raise BackendError(f"seq {row.seq_id} owns slot {live.slot}, not {slot}")
                claimed[slot] = row.seq_id
            slots.append(slot)
        free = [s for s in range(size) if s not in claimed and s not in owner]
        for index, slot in enumerate(slots):
            if slot is None:
                if not free:
                    raise BackendError(
                        f"no free slot for seq {rows[index].seq_id}: all {size} are live"
                    )
                slots[index] = free.pop(0)
        return [slot for slot in slots if slot is not None]  # every row has one by now

    def _check_row_length(self, row: PrefillRow) -> None:
        if row.start_position != 0:
            raise BackendError(
                f"prefill of seq {row.seq_id} starts at position {row.start_position}; static "
                "slots are written from position 0 (no chunked prefill)"
            )
        longest = self._executor.max_context_length
        if len(row.token_ids) > longest:
            raise BackendError(
                f"prefill of seq {row.seq_id} has {len(row.token_ids)} tokens, past the "
                f"compiled context length {longest}"
            )

    def _check_token_ids(self, seq_id: int, token_ids: Sequence[int]) -> None:
        vocab = self._executor.vocab_size
        if not token_ids:
            raise BackendError(f"seq {seq_id} has no tokens to run")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise BackendError(f"seq {seq_id} has a token id outside the vocabulary [0, {vocab})")

    # -- lifecycle ------------------------------------------------------------------------

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the slots of `seq_ids`; ids that hold none are ignored."""
        self._drop(seq_ids)

    def _drop(self, seq_ids: Sequence[int]) -> None:
        slots = [live.slot for seq_id in seq_ids if (live := self._live.pop(seq_id, None))]
        if slots and not self._closed:
            self._executor.clear(slots)

    def kv_usage(self) -> KVUsage:
        capacity = self._capacity.max_total_tokens if self._capacity is not None else 0
        used = sum(live.num_tokens for live in self._live.values())
        return KVUsage(frozenset(self._live), used, capacity)

    def slot_of(self, seq_id: int) -> int | None:
        """The slot `seq_id` owns, or None (for tests and debugging)."""
        live = self._live.get(seq_id)
        return live.slot if live is not None else None

    def health(self) -> None:
        self._require_open()
        try:
            self._executor.health()
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"neuron health forward failed: {exc}") from exc

    def close(self) -> None:
        """Free the KV and the model; later calls raise BackendError."""
        if not self._closed:
            self._closed = True
            self._live.clear()
            self._executor.close()

    def _require_open(self) -> None:
        if self._closed:
            raise BackendError("the neuron backend was closed")

    def _require_warm(self) -> None:
        self._require_open()
        if self._capacity is None:
            raise BackendError("warmup() must run before prefill or decode")
