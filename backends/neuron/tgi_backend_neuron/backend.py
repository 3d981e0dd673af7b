"""The neuron backend: tgi's contract (v2) over a static-shape executor of B slots x L tokens.

NOTE: the executor (`SlotExecutor`) is the compiled model: optimum-neuron's
`NeuronModelForCausalLM` on Inferentia2/Trainium (`_optimum.py`), or the CPU emulator
(`_emulator.py`). It has two graphs, a context graph (prefill: rows written from
position 0) and a decode graph (one token per row), so this class splits each step:

    step(plan):  drop plan.finished + plan.preempted         (their slots are free again)
                 prefill call: plan.new rows, in their slots
                               + in rebuild mode, every live slot, re-written (no logits)
                 decode call:  plan.running, one token (last_token) per row
                 StepOutput:   new rows with want_logits, then decode rows   [R, 1, V]

The policy owns the slots: a NewSequence names its slot, and the policy never sends
more than B rows or lets a sequence outgrow L (`warmup` checks the limits it promises
against the compiled shape once). Per step this class only refuses a plan it cannot
run at all (a new row without a slot, a chunk or draft row, a decode at a position its
slot does not hold), before the executor sees it.

Rebuild mode (`prefill_rebuilds_cache`: compiled without continuous batching, so the
context graph rewrites every slot's KV): this class has seen every token each live
sequence was fed (its prompt, then each decode row's `last_token`), so when new
sequences arrive it re-prefills each live slot with exactly its KV tokens together with
them, and the running rows then decode as usual:

    slot 0  seq 17  KV [p0 .. p8 g0 g1]   rebuild row [p0 .. p8 g0 g1], no logits
    slot 1  seq 23  new                   new row     its prompt, logits
    decode          seq 17 feeds g2 at position 11, as it would have alone

so a sequence's tokens do not depend on who joined mid-stream.

A failed executor call leaves the KV of the slots it touched undefined (every slot,
where the compiled graph runs the whole batch): those sequences are dropped here and
the step raises `BackendError`, so `kv_usage()` never lists a broken slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    NewSequence,
    RunningSequence,
    StepConstraints,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.errors import BackendError
from tgi_backend_neuron._sampling import DEVICE_PARAMETERS, GREEDY, RowSampling, row_sampling

logger = logging.getLogger(__name__)

__all__ = ["NeuronBackend", "SlotExecutor"]

# What an executor call raises when the device or the emulator fails.
_EXECUTOR_ERRORS = (RuntimeError, ValueError, IndexError)


class SlotExecutor(Protocol):
    """A model compiled for `batch_size` slots of `sequence_length` tokens each.

    Called from one thread. Slots are indices in [0, batch_size); the caller keeps every
    prefill row within `max_context_length` tokens and every slot within
    `sequence_length`. An executor that samples on its device (`samples_on_device`)
    returns token ids [n] where the others return logits [n, V], and samples each row
    as its `RowSampling` says (None: greedy).
    """

    batch_size: int  # B
    sequence_length: int  # L
    max_context_length: int  # longest row the context graph (prefill) takes
    continuous_batching: bool  # False: the context graph rewrites every slot's KV
    samples_on_device: bool  # True: results are sampled token ids, not logits
    # True: every device call runs all B slots (padding rows included), so a failed call
    # leaves every live slot's KV undefined, whatever the mode
    calls_touch_every_slot: bool
    max_top_k: int | None  # the device sampler's largest top_k (samples_on_device only)
    vocab_size: int
    dtype: torch.dtype
    bytes_per_token: int  # KV bytes one token costs, all layers, keys and values

    def warmup(self, num_tokens: int) -> None:
        """Allocate the KV and run a `num_tokens` prefill once; leaves every slot empty."""
        ...

    def prefill(
        self,
        slots: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        sampling: Sequence[RowSampling] | None = None,
    ) -> torch.Tensor:
        """Write each slot's KV from position 0 with its tokens; logits [n, V] (or token
        ids [n]) of the last position of each row. Without continuous batching every
        slot not named holds nothing afterwards (the compiled graph rewrites the batch)."""
        ...

    def decode(
        self,
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
        sampling: Sequence[RowSampling] | None = None,
    ) -> torch.Tensor:
        """Feed one token per slot at `positions`; logits [n, V] (or token ids [n]).
        Slots not named keep their KV, whatever the compiled graph computes for them."""
        ...

    def clear(self, slots: Sequence[int]) -> None:
        """Forget the KV of `slots`."""
        ...

    def health(self) -> None:
        """A real forward that leaves every slot as it was; raises when it fails."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings of its own for /info's engine details, beyond the attributes above
        (which the backend reports itself): e.g. the export's cores and target."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Live:
    """One live sequence: the slot it owns and every token its KV holds, in order."""

    slot: int
    token_ids: list[int] = field(default_factory=list)  # what a rebuild re-prefills
    sampling: RowSampling = GREEDY  # how the device samples it (samples_on_device)


class NeuronBackend:
    """`tgi.backend.Backend` with static slots, over a `SlotExecutor`."""

    def __init__(self, executor: SlotExecutor, *, device_type: str) -> None:
        self._executor = executor
        self.device_type = (
            device_type  # /info's model_device_type: "xla" (as TGI), "neuron (emulated)"
        )
        self.dtype = executor.dtype
        self._rebuild = not executor.continuous_batching
        self._capabilities = Capabilities(
            batching=Batching.STATIC,
            kv_layout=KvLayout.SLOTS,
            static_batch_size=executor.batch_size,
            static_max_length=executor.sequence_length,
            prefill_rebuilds_cache=self._rebuild,
            samples_on_device=executor.samples_on_device,
            sampling_parameters=DEVICE_PARAMETERS if executor.samples_on_device else frozenset(),
            max_top_k=executor.max_top_k if executor.samples_on_device else None,
        )
        self._live: dict[int, _Live] = {}  # seq_id -> its slot and KV tokens
        self._capacity: KVCapacity | None = None
        self._closed = False
        self.rebuilt_rows = 0  # live slots re-prefilled because new sequences arrived

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def executor(self) -> SlotExecutor:
        return self._executor

    @property
    def engine_details(self) -> dict[str, str]:
        """The compiled shapes /info shows under `engine.details`."""
        executor = self._executor
        details = {
            "batch_size": executor.batch_size,
            "sequence_length": executor.sequence_length,
            "max_context_length": executor.max_context_length,
            "continuous_batching": executor.continuous_batching,
            "on_device_sampling": executor.samples_on_device,
            "max_topk": executor.max_top_k,
            "dtype": str(executor.dtype).removeprefix("torch."),
            **executor.describe(),
            "mode": "prefill rebuilds KV" if self._rebuild else "continuous batching",
        }
        return {key: str(value) for key, value in details.items()}

    # -- warmup ---------------------------------------------------------------------------

    def warmup(self, limits: Limits) -> WarmupReport:
        """Check `limits` against the compiled shape, run the longest prefill once, report
        B x L tokens and the step shapes the graphs take."""
        self._require_open()
        longest = self._check_limits(limits)
        started = time.perf_counter()
        try:
            self._executor.warmup(longest)
        except _EXECUTOR_ERRORS as exc:
            raise BackendError(f"neuron warmup failed: {exc}") from exc
        size, length = self._executor.batch_size, self._executor.sequence_length
        self._capacity = KVCapacity(
            total_tokens=size * length,
            bytes_per_token=self._executor.bytes_per_token,
            max_sequences=size,
        )
        # Both graphs are compiled for B rows. Without continuous batching the executor
        # runs all B of them every call (absent slots get dummy rows), so B is also every
        # step's padded row count. The context graph pads a prefill to its longest row,
        # not to a bucket, so there are no length buckets, only its cap of
        # max_context_length tokens a row (also what a recompute must fit in).
        constraints = StepConstraints(
            batch_buckets=(size,) if self._rebuild else (),
            max_rows_per_step=size,
            max_chunk_tokens=self._executor.max_context_length,
        )
        seconds = time.perf_counter() - started
        logger.info(
            "neuron warmup (%s): %d slots x %d tokens, %s; %d-token prefill took %.3f s",
            self.device_type,
            size,
            length,
            "prefill rebuilds KV" if self._rebuild else "continuous batching",
            longest,
            seconds,
        )
        return WarmupReport(kv=self._capacity, constraints=constraints, seconds=seconds)

    def _check_limits(self, limits: Limits) -> int:
        """BackendError naming the setting when `limits` outgrow the compiled shape; else
        the longest prefill row they allow."""
        size, length = self._executor.batch_size, self._executor.sequence_length
        context = self._executor.max_context_length
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
        if limits.max_input_tokens > context:
            raise BackendError(
                f"--max-input-tokens {limits.max_input_tokens} is more than the compiled "
                f"context length {context}; lower it"
            )
        if not self._rebuild or size == 1:  # one slot: nobody else to rebuild
            return limits.max_input_tokens
        # A rebuild re-prefills a live slot's KV: up to max_total_tokens - 1 tokens a row.
        if limits.max_total_tokens - 1 > context:
            raise BackendError(
                f"--max-total-tokens {limits.max_total_tokens} is more than the compiled "
                f"context length {context} + 1: without continuous batching a new sequence "
                "re-prefills each live one, up to max_total_tokens - 1 tokens a row; lower "
                f"it to at most {context + 1}"
            )
        return max(limits.max_input_tokens, limits.max_total_tokens - 1)

    # -- steps ----------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepOutput:
        """Drop `finished` and `preempted`, write the new rows (and, in rebuild mode,
        every live slot), decode the running rows; logits [R, 1, V] of
        `plan.logits_rows`, in order."""
        self._require_warm()
        ended = [*plan.finished, *plan.preempted]
        new_slots = self._check_plan(plan, frozenset(ended))  # a refused plan changes nothing
        self._drop(ended)
        parts: list[torch.Tensor] = []  # [n, V] each, or [n] sampled token ids
        if plan.new:
            parts.append(self._prefill(plan.new, new_slots))
        if plan.running:
            parts.append(self._decode(plan.running))
        seq_ids = tuple(row.seq_id for row in plan.logits_rows)
        if self._executor.samples_on_device:
            token_ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            return StepOutput(seq_ids, logits=None, token_ids=token_ids.long())  # [R]
        if parts:
            logits = torch.cat(parts, dim=0).float()  # [R, V]
        else:
            logits = torch.empty((0, self._executor.vocab_size), dtype=torch.float32)
        return StepOutput(seq_ids, logits.unsqueeze(1))  # [R, 1, V]

    def _check_plan(self, plan: StepPlan, ended: frozenset[int]) -> list[int]:
        """BackendError, before anything runs, for a row these graphs cannot compute
        (`ended`: dropped by this step, so not live for its rows); else the slots of the
        new rows."""
        size = self._executor.batch_size
        slots: list[int] = []
        for new in plan.new:
            if new.slot is None or not 0 <= new.slot < size:
                raise BackendError(
                    f"new seq {new.seq_id} names slot {new.slot}: static slots need one in "
                    f"[0, {size}), assigned by the policy"
                )
            if new.start_position != 0 or not new.token_ids:
                raise BackendError(
                    f"new seq {new.seq_id} starts at position {new.start_position} with "
                    f"{len(new.token_ids)} tokens; static slots are written whole from "
                    "position 0 (no chunked prefill, no prefix caching)"
                )
            slots.append(new.slot)
        for row in plan.running:
            live = None if row.seq_id in ended else self._live.get(row.seq_id)
            if live is None:
                raise BackendError(f"running seq {row.seq_id} holds no slot here")
            if not row.decode or row.token_ids or row.last_token is None:
                raise BackendError(
                    f"running seq {row.seq_id} is not a one-token decode row; the neuron "
                    "backend has no chunked prefill and no speculation"
                )
            if row.start_position != len(live.token_ids):
                raise BackendError(
                    f"decode of seq {row.seq_id} at position {row.start_position} but its "
                    f"slot holds {len(live.token_ids)} tokens"
                )
        return slots

    def _prefill(self, new: Sequence[NewSequence], new_slots: list[int]) -> torch.Tensor:
        """One context-graph call: the new rows, then (rebuild mode) every live slot with
        its KV tokens; logits [n, V] of the new rows that want them."""
        rebuilt = list(self._live.items()) if self._rebuild else []
        slots = new_slots + [live.slot for _, live in rebuilt]
        token_ids: list[Sequence[int]] = [row.token_ids for row in new]
        token_ids += [live.token_ids for _, live in rebuilt]
        choices = [self._sampling_of(row) for row in new] + [GREEDY] * len(rebuilt)
        try:
            logits = self._executor.prefill(slots, token_ids, choices)  # [n, V] or [n]
        except _EXECUTOR_ERRORS as exc:
            touched = self._executor.calls_touch_every_slot
            self._drop(list(self._live) if touched else [seq_id for seq_id, _ in rebuilt])
            self._executor.clear(new_slots)  # possibly half written
            raise BackendError(f"neuron prefill failed: {exc}") from exc
        self.rebuilt_rows += len(rebuilt)
        for row, slot, choice in zip(new, new_slots, choices, strict=False):
            self._live[row.seq_id] = _Live(slot, list(row.token_ids), choice)
        wanted = [i for i, row in enumerate(new) if row.want_logits]
        index = torch.tensor(wanted, dtype=torch.long, device=logits.device)
        return logits.index_select(0, index)  # [n_wanted, V]

    def _decode(self, running: Sequence[RunningSequence]) -> torch.Tensor:
        """One decode-graph call: each row's `last_token` at its position; logits [n, V]."""
        lives = [self._live[row.seq_id] for row in running]
        tokens = [row.input_ids[0] for row in running]  # the last token; no drafts
        try:
            logits = self._executor.decode(
                [live.slot for live in lives],
                tokens,
                [row.start_position for row in running],
                [live.sampling for live in lives],
            )
        except _EXECUTOR_ERRORS as exc:
            # A decode that runs every slot (compiled without continuous batching, or an
            # executor whose calls always carry all B rows) leaves them all undefined.
            every = self._rebuild or self._executor.calls_touch_every_slot
            self._drop(list(self._live) if every else [row.seq_id for row in running])
            raise BackendError(f"neuron decode failed: {exc}") from exc
        for live, token in zip(lives, tokens, strict=True):
            live.token_ids.append(token)
        return logits

    def _sampling_of(self, row: NewSequence) -> RowSampling:
        """How the device samples `row` (greedy when the executor returns logits)."""
        if not self._executor.samples_on_device:
            return GREEDY
        return row_sampling(row.sampling, self._executor.max_top_k or 1)

    # -- lifecycle ------------------------------------------------------------------------

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the slots of `seq_ids`; ids that hold none are ignored."""
        self._drop(seq_ids)

    def _drop(self, seq_ids: Sequence[int]) -> None:
        slots = [live.slot for seq_id in seq_ids if (live := self._live.pop(seq_id, None))]
        if slots and not self._closed:
            self._executor.clear(slots)

    def kv_usage(self) -> KVUsage:
        capacity = self._capacity.total_tokens if self._capacity is not None else 0
        used = sum(len(live.token_ids) for live in self._live.values())
        return KVUsage(frozenset(self._live), used, capacity)

    def slot_of(self, seq_id: int) -> int | None:
        """The slot `seq_id` owns, or None (for tests and debugging)."""
        live = self._live.get(seq_id)
        return live.slot if live is not None else None

    def health(self) -> None:
        self._require_open()
        try:
            self._executor.health()
        except _EXECUTOR_ERRORS as exc:
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
            raise BackendError("warmup() must run before step()")
