"""The static-slots policy and the router over a static-shape backend.

`StaticFakeBackend` plays a Neuron-like backend of B slots on top of the fake backend's
computable "model": it refuses any step that breaks static shapes (more than B rows, a
new row without a slot, a slot held by another sequence, a running row whose slot
moved), so every test below also checks that the policy never plans one. Where it
rebuilds on prefill (compiled without continuous batching) it re-writes every live slot
itself from the tokens it was fed, as the Neuron backend does under contract v2.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tgi.backend.contract import (
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    Limits,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.errors import BackendError
from tgi.router.policies import (
    Budget,
    Candidate,
    PolicyLimits,
    SlotTable,
    StaticSlotsPolicy,
)
from tgi.router.request import ErrorEvent, FinalEvent
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters
from tgi.testing.fake_backend import FakeBackend, expected_tokens

LENGTH = 256  # compiled sequence length of the fake; tests/conftest.py sets max_total_tokens 256


class StaticFakeBackend(FakeBackend):
    """B static slots over FakeBackend's token-list "KV"; strict about static shapes."""

    def __init__(
        self,
        vocab_size: int,
        *,
        slots: int = 4,
        rebuild: bool = True,
        lose_after_decodes: dict[int, int] | None = None,
        fail_prefill_call: int | None = None,
        stray_seq_id: int | None = None,
    ) -> None:
        super().__init__(vocab_size, capacity_tokens=slots * LENGTH)
        self.num_slots = slots
        self._capabilities = Capabilities(
            batching=Batching.STATIC,
            kv_layout=KvLayout.SLOTS,
            static_batch_size=slots,
            static_max_length=LENGTH,
            prefill_rebuilds_cache=rebuild,
        )
        self.slot_of: dict[int, int] = {}
        self.slots_used: list[tuple[int, int]] = []  # (seq_id, slot), in admission order
        self.rebuilt: list[int] = []  # seq_ids of slots rewritten for a newcomer, in order
        self.max_rows = 0
        self.prefill_calls = 0
        self.lose_after_decodes = dict(lose_after_decodes or {})  # seq_id -> decodes
        self.fail_prefill_call = fail_prefill_call  # 1-based prefilling step that raises
        self.stray_seq_id = stray_seq_id  # invented into KV at the first prefill
        self._decodes: dict[int, int] = {}

    def warmup(self, limits: Limits) -> WarmupReport:
        if limits.max_batch_size is None or limits.max_batch_size > self.num_slots:
            raise BackendError(f"max_batch_size {limits.max_batch_size} > {self.num_slots}")
        if limits.max_total_tokens > LENGTH:
            raise BackendError("max_total_tokens past the compiled length")
        kv = KVCapacity(self.capacity_tokens, bytes_per_token=4, max_sequences=self.num_slots)
        return WarmupReport(kv=kv)

    def _check_slots(self, plan: StepPlan) -> None:
        rows = plan.rows
        if len(rows) > self.num_slots:
            raise BackendError(f"{len(rows)} rows for {self.num_slots} slots")
        self.max_rows = max(self.max_rows, len(rows))
        dropped = {*plan.finished, *plan.preempted}
        held = {seq: slot for seq, slot in self.slot_of.items() if seq not in dropped}
        for new in plan.new:
            if new.slot is None or not 0 <= new.slot < self.num_slots:
                raise BackendError(f"new seq {new.seq_id} has slot {new.slot}")
            holder = next((s for s, slot in held.items() if slot == new.slot), None)
            if holder is not None:
                raise BackendError(f"slot {new.slot} of seq {new.seq_id} is held by {holder}")
            held[new.seq_id] = new.slot
        for row in plan.running:
            if row.seq_id not in held:
                raise BackendError(f"seq {row.seq_id} runs without a slot")

    def step(self, plan: StepPlan) -> StepOutput:
        self._check_slots(plan)
        if plan.new:
            self.prefill_calls += 1
            if self.prefill_calls == self.fail_prefill_call:
                rewritten = (
                    [*plan.new, *plan.running]
                    if self.capabilities.prefill_rebuilds_cache
                    else plan.new
                )
                self._drop([row.seq_id for row in rewritten])
                for row in rewritten:
                    self.slot_of.pop(row.seq_id, None)
                raise BackendError("injected prefill failure")
            if self.capabilities.prefill_rebuilds_cache:
                dropped = {*plan.finished, *plan.preempted}
                self.rebuilt += [s for s in self.kv if s not in dropped]
        for seq_id in (*plan.finished, *plan.preempted):
            self.slot_of.pop(seq_id, None)
        output = super().step(plan)
        for new in plan.new:
            self.slot_of[new.seq_id] = new.slot  # type: ignore[assignment]
            self.slots_used.append((new.seq_id, new.slot))  # type: ignore[arg-type]
        for row in plan.running:
            self._decodes[row.seq_id] = self._decodes.get(row.seq_id, 0) + 1
            if self._decodes[row.seq_id] == self.lose_after_decodes.get(row.seq_id):
                self.kv.pop(row.seq_id)  # the device "forgets" the sequence
        if plan.new and self.stray_seq_id is not None:
            self.kv[self.stray_seq_id] = [0]
            self.stray_seq_id = None
        return output

    def release(self, seq_ids: Any) -> None:
        for seq_id in seq_ids:
            self.slot_of.pop(seq_id, None)
        super().release(seq_ids)


async def collect(handle: RequestHandle) -> list[Any]:
    async def drain() -> list[Any]:
        return [event async for event in handle.events()]

    return await asyncio.wait_for(drain(), timeout=60)


def submit(state: Any, prompt: str, **params: Any) -> RequestHandle:
    return state.router.submit(state.validator.validate(prompt, ClientParameters(**params)))


PROMPTS = [f"request {i}: " + "abcdefghij"[: i + 1] for i in range(10)]


# -- the policy on its own ------------------------------------------------------------------


def budget(running: int = 0, **values: Any) -> Budget:
    defaults: dict[str, Any] = {
        "reserved_tokens": 0,
        "max_batch_total_tokens": 4 * LENGTH,
        "max_batch_prefill_tokens": 1000,
        "max_batch_size": 4,
        "steps_since_prefill": 0,
    }
    return Budget(running=running, **{**defaults, **values})


def policy(rebuild: bool, **values: Any) -> StaticSlotsPolicy:
    defaults: dict[str, Any] = {"waiting_served_ratio": 1.2, "max_waiting_tokens": 20}
    limits = PolicyLimits(
        max_batch_prefill_tokens=1000,
        max_batch_total_tokens=4 * LENGTH,
        max_batch_size=4,
        **{**defaults, **values},
    )
    return StaticSlotsPolicy(limits, num_slots=4, max_length=LENGTH, rebuild=rebuild)


def candidates(*input_tokens: int) -> list[Candidate]:
    return [Candidate(i + 1, n, n + 10) for i, n in enumerate(input_tokens)]


def test_slot_table_gives_the_lowest_free_slot_and_never_one_twice() -> None:
    table = SlotTable(3)
    assert [table.take(seq) for seq in (10, 11, 12)] == [0, 1, 2]
    with pytest.raises(ValueError, match="all 3 slots are taken"):
        table.take(13)
    with pytest.raises(ValueError, match="already owns slot 0"):
        table.take(10)
    table.free([11, 999])
    assert table.num_free == 1
    assert table.take(13) == 1
    assert table.retain([10]) == [12, 13]
    assert dict(table.assignment) == {10: 0}


def test_admission_fills_free_slots_first_come_first_served() -> None:
    static = policy(rebuild=False)
    static.slots.take(100)  # one slot already running
    admitted = static.admit(candidates(5, 6, 7, 8, 9), budget(running=1))
    assert admitted.seq_ids == (1, 2, 3)  # three free slots, arrival order


def test_admission_respects_max_batch_size_below_the_slot_count() -> None:
    static = policy(rebuild=False)
    assert static.admit(candidates(5, 6, 7), budget(max_batch_size=2)).seq_ids == (1, 2)


def test_admission_stops_at_the_first_request_over_the_prefill_budget() -> None:
    static = policy(rebuild=False)
    admitted = static.admit(candidates(50, 60, 5), budget(max_batch_prefill_tokens=100))
    assert admitted.seq_ids == (1,)  # FCFS: the short third one does not jump the queue


def test_insert_mode_admits_newcomers_at_once() -> None:
    static = policy(rebuild=False)
    for seq in (100, 101, 102):
        static.slots.take(seq)
    assert static.admit(candidates(5), budget(running=3)).seq_ids == (1,)


def test_rebuild_mode_waits_for_enough_newcomers_or_max_waiting_tokens() -> None:
    static = policy(rebuild=True)
    for seq in (100, 101, 102):
        static.slots.take(seq)
    # 1 newcomer < int(3 running x 1.2): rebuilding three slots for it waits...
    assert static.admit(candidates(5), budget(running=3)).seq_ids == ()
    # ...until max_waiting_tokens decode steps have passed.
    late = budget(running=3, steps_since_prefill=20)
    assert static.admit(candidates(5), late).seq_ids == (1,)
    # With nothing running there is nothing to rebuild: admit at once.
    assert policy(rebuild=True).admit(candidates(5), budget()).seq_ids == (1,)


def test_from_capabilities_refuses_a_continuous_backend() -> None:
    caps = Capabilities(batching=Batching.CONTINUOUS, kv_layout=KvLayout.PER_ROW)
    with pytest.raises(ValueError, match="static slots need batching=STATIC"):
        StaticSlotsPolicy.from_capabilities(
            caps,
            PolicyLimits(max_batch_prefill_tokens=1, max_batch_total_tokens=1, max_batch_size=1),
        )


# -- the scheduler over a static backend ------------------------------------------------------


def test_the_launcher_picks_the_policy_from_capabilities(
    make_state: Any, byte_tokenizer: Any
) -> None:
    static = make_state(StaticFakeBackend(len(byte_tokenizer), rebuild=False), max_batch_size=4)
    assert isinstance(static.router.policy, StaticSlotsPolicy)
    assert static.router.policy.num_slots == 4 and not static.router.policy.rebuild
    continuous = make_state()
    assert not isinstance(continuous.router.policy, StaticSlotsPolicy)


@pytest.mark.parametrize("rebuild", [True, False], ids=["rebuild", "insert"])
async def test_ten_requests_on_four_slots_all_complete_with_their_solo_tokens(
    make_state: Any, byte_tokenizer: Any, rebuild: bool
) -> None:
    backend = StaticFakeBackend(len(byte_tokenizer), rebuild=rebuild)
    # max_waiting_tokens 2: in rebuild mode newcomers join mid-stream, forcing rebuilds.
    state = make_state(backend, max_batch_size=4, max_waiting_tokens=2)
    state.router.start()
    try:
        handles = [
            submit(state, prompt, max_new_tokens=8 + 3 * (i % 4))
            for i, prompt in enumerate(PROMPTS)
        ]
        results = await asyncio.gather(*(collect(handle) for handle in handles))
    finally:
        await state.router.stop()
    for i, (prompt, events) in enumerate(zip(PROMPTS, results, strict=True)):
        assert isinstance(events[-1], FinalEvent), events[-1]
        alone = expected_tokens(byte_tokenizer.encode(prompt), 8 + 3 * (i % 4), len(byte_tokenizer))
        assert [event.token.id for event in events] == alone
    assert backend.max_rows == 4  # the queue waited for slots; no step had more rows
    assert not backend.kv and not backend.slot_of
    assert state.router.policy.slots.num_free == 4
    if rebuild:
        assert backend.rebuilt, "no newcomer joined a running batch: the test proves nothing"
    else:
        assert not backend.rebuilt


async def test_a_cancelled_request_frees_its_slot_for_the_next_one(
    make_state: Any, byte_tokenizer: Any
) -> None:
    backend = StaticFakeBackend(len(byte_tokenizer), slots=2, rebuild=False)
    state = make_state(backend, max_batch_size=2)
    state.router.start()
    try:
        leaver = submit(state, "leaves", max_new_tokens=200)
        stayer = submit(state, "stays", max_new_tokens=30)
        waiter = submit(state, "waits", max_new_tokens=3)
        stream: Any = leaver.events()  # an async generator: aclose() is the client leaving
        await stream.__anext__()
        await stream.aclose()  # the client goes away: its slot must be reused
        waited = await collect(waiter)
        stayed = await collect(stayer)
    finally:
        await state.router.stop()
    assert isinstance(waited[-1], FinalEvent) and isinstance(stayed[-1], FinalEvent)
    slot_of = dict(backend.slots_used)
    assert slot_of[waiter.seq_id] == slot_of[leaver.seq_id]
    assert leaver.seq_id in backend.released


async def test_a_failed_rebuild_recomputes_the_newcomer_and_the_rows_it_rewrote(
    make_state: Any, byte_tokenizer: Any
) -> None:
    backend = StaticFakeBackend(len(byte_tokenizer), rebuild=True, fail_prefill_call=2)
    state = make_state(backend, max_batch_size=4, max_waiting_tokens=0)
    state.router.start()
    try:
        running = submit(state, "first", max_new_tokens=50)
        stream = running.events()
        head = await stream.__anext__()
        joiner = submit(state, "second", max_new_tokens=5)  # its prefill rebuilds "first"
        joined = await collect(joiner)
        rest = [event async for event in stream]
        after = await collect(submit(state, "third", max_new_tokens=4))
    finally:
        await state.router.stop()
    # the failure was the step's, not one row's: both are retried once and finish
    second = expected_tokens(byte_tokenizer.encode("second"), 5, len(byte_tokenizer))
    assert isinstance(joined[-1], FinalEvent) and [e.token.id for e in joined] == second
    # "first" lost its KV with the failed step; it is recomputed, not failed
    assert isinstance(rest[-1], FinalEvent)
    alone = expected_tokens(byte_tokenizer.encode("first"), 50, len(byte_tokenizer))
    assert [event.token.id for event in (head, *rest)] == alone
    assert isinstance(after[-1], FinalEvent)
    assert not backend.kv and state.router.policy.slots.num_free == 4


async def test_a_sequence_the_backend_lost_fails_instead_of_decoding(
    make_state: Any, byte_tokenizer: Any
) -> None:
    backend = StaticFakeBackend(len(byte_tokenizer), rebuild=False)
    state = make_state(backend, max_batch_size=4)
    state.router.start()
    try:
        lost = submit(state, "forgotten", max_new_tokens=20)
        kept = submit(state, "remembered", max_new_tokens=20)
        backend.lose_after_decodes[lost.seq_id] = 3
        lost_events, kept_events = await asyncio.gather(collect(lost), collect(kept))
    finally:
        await state.router.stop()
    assert isinstance(lost_events[-1], ErrorEvent)
    assert "lost the state of request" in lost_events[-1].message
    assert isinstance(kept_events[-1], FinalEvent) and kept_events[-1].generated_tokens == 20
    assert state.router.policy.slots.num_free == 4
    assert not state.router.healthy  # /health now runs a real forward before saying ok


async def test_a_stray_sequence_in_the_backend_is_released(
    make_state: Any, byte_tokenizer: Any
) -> None:
    backend = StaticFakeBackend(len(byte_tokenizer), rebuild=False, stray_seq_id=4242)
    state = make_state(backend, max_batch_size=4)
    state.router.start()
    try:
        events = await collect(submit(state, "normal", max_new_tokens=6))
    finally:
        await state.router.stop()
    assert isinstance(events[-1], FinalEvent)
    assert 4242 in backend.released and not backend.kv
