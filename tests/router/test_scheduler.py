"""The scheduler loop against the fake backend: batching, stopping, release, failures."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tgi.errors import Overloaded
from tgi.router.request import ErrorEvent, FinalEvent, FinishReason, TokenEvent
from tgi.router.router import Router
from tgi.testing.fake_backend import FakeBackend, expected_tokens
from tgi.testing.requests import collect, submit


async def wait_until(condition: Any, router: Router) -> None:
    """Yield to the loop until `condition()` holds (bounded, no sleeping)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_greedy_tokens_match_the_model(make_state: Any, byte_tokenizer: Any) -> None:
    state = make_state()
    state.router.start()
    try:
        events = await collect(submit(state, "hello", max_new_tokens=6))
    finally:
        await state.router.stop()
    prompt_ids = byte_tokenizer.encode("hello")
    want = expected_tokens(prompt_ids, 6, len(byte_tokenizer))
    assert [e.token.id for e in events] == want
    assert [e.index for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    final = events[-1]
    assert isinstance(final, FinalEvent)
    assert final.finish_reason is FinishReason.LENGTH
    assert final.generated_tokens == 6
    assert final.input_length == len(prompt_ids)
    assert final.seed is None


async def test_a_request_joins_a_running_batch_before_it_finishes(
    make_state: Any, byte_tokenizer: Any
) -> None:
    gate = threading.Event()
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=gate)
    state = make_state(backend)
    state.router.start()
    try:
        first = submit(state, "a long running request", max_new_tokens=40)
        gate.set()
        first_stream = first.events()
        first_events = [await first_stream.__anext__() for _ in range(3)]
        break_after = first_events[-1]
        second = submit(state, "joiner", max_new_tokens=5)
        second_task = asyncio.ensure_future(collect(second))
        rest_task = asyncio.ensure_future(collect(first_stream))
        second_events = await second_task
        first_events += await rest_task
    finally:
        gate.set()
        await state.router.stop()
    assert isinstance(break_after, TokenEvent)
    # The joiner finished while the first request was still decoding: it did not wait.
    decode_calls = [ids for method, ids in backend.calls if method == "decode"]
    together = [ids for ids in decode_calls if len(ids) == 2]
    assert together, "the two requests never decoded in one batch"
    assert len(first_events) == 40
    assert [e.token.id for e in second_events] == expected_tokens(
        byte_tokenizer.encode("joiner"), 5, len(byte_tokenizer)
    )
    assert [e.token.id for e in first_events] == expected_tokens(
        byte_tokenizer.encode("a long running request"), 40, len(byte_tokenizer)
    )


async def test_finished_rows_release_their_kv_at_once(make_state: Any) -> None:
    state = make_state()
    backend: FakeBackend = state.router.engine.backend  # type: ignore[attr-defined]
    state.router.start()
    try:
        short = submit(state, "short", max_new_tokens=2)
        long = submit(state, "longer one", max_new_tokens=30)
        await collect(short)
        # Released before the long one ends, not when the batch drains.
        await wait_until(lambda: short.seq_id in backend.released, state.router)
        assert long.seq_id in backend.kv
        await collect(long)
        await wait_until(lambda: not backend.kv, state.router)
    finally:
        await state.router.stop()
    assert sorted(backend.released) == sorted([short.seq_id, long.seq_id])
    assert state.router.stats().kv.used_tokens == 0


async def test_cancel_frees_kv_and_others_go_on(make_state: Any, byte_tokenizer: Any) -> None:
    state = make_state()
    backend: FakeBackend = state.router.engine.backend  # type: ignore[attr-defined]
    state.router.start()
    try:
        leaver = submit(state, "client leaves", max_new_tokens=100)
        stayer = submit(state, "client stays", max_new_tokens=20)
        leaver_stream = leaver.events()
        await leaver_stream.__anext__()
        await leaver_stream.aclose()  # the consumer stops early: the handle cancels itself
        await wait_until(lambda: leaver.seq_id in backend.released, state.router)
        events = await collect(stayer)
    finally:
        await state.router.stop()
    assert leaver.seq_id not in backend.kv
    assert [e.token.id for e in events] == expected_tokens(
        byte_tokenizer.encode("client stays"), 20, len(byte_tokenizer)
    )


async def test_cancel_while_waiting_never_reaches_the_backend(make_state: Any) -> None:
    gate = threading.Event()
    state = make_state(FakeBackend(vocab_size=300, step_gate=gate))
    backend: FakeBackend = state.router.engine.backend  # type: ignore[attr-defined]
    handle = submit(state, "never scheduled", max_new_tokens=3)
    handle.cancel()  # before the loop ever ran
    state.router.start()
    gate.set()
    try:
        other = await collect(submit(state, "scheduled", max_new_tokens=2))
    finally:
        await state.router.stop()
    assert len(other) == 2
    assert all(handle.seq_id not in ids for _, ids in backend.calls)


async def test_a_failing_prefill_fails_only_its_request(
    make_state: Any, byte_tokenizer: Any
) -> None:
    bad_prompt = tuple(byte_tokenizer.encode("poison"))
    backend = FakeBackend(vocab_size=len(byte_tokenizer), fail_prompts=[bad_prompt])
    state = make_state(backend)
    state.router.start()
    try:
        good = submit(state, "fine", max_new_tokens=10)
        good_stream = good.events()
        first = await good_stream.__anext__()
        bad = submit(state, "poison", max_new_tokens=10)
        bad_events = await collect(bad)
        good_events = [first, *await collect(good_stream)]
    finally:
        await state.router.stop()
    assert len(bad_events) == 1 and isinstance(bad_events[0], ErrorEvent)
    assert "injected failure" in bad_events[0].message
    assert isinstance(good_events[-1], FinalEvent)
    assert good_events[-1].generated_tokens == 10
    assert not backend.kv


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
async def test_stop_sequence_ends_a_sequence(make_state: Any, overlap: bool) -> None:
    state = make_state(overlap_steps=overlap)
    state.router.start()
    try:
        # Find a prompt whose output has a clean character after the second token.
        for n in range(50):
            prompt = f"stop test {n}"
            free = await collect(submit(state, prompt, max_new_tokens=12))
            texts = [event.token.text for event in free]
            clean = [i for i in range(2, 12) if texts[i].isprintable() and texts[i]]
            if clean:
                break
        else:
            pytest.fail("no prompt produced printable text")
        k = clean[0]
        events = await collect(submit(state, prompt, max_new_tokens=12, stop=(texts[k],)))
    finally:
        await state.router.stop()
    final = events[-1]
    assert final.finish_reason is FinishReason.STOP_SEQUENCE
    assert final.generated_text.endswith(texts[k])  # TGI keeps the stop sequence
    assert final.generated_tokens <= k + 1
    assert [e.token.id for e in events] == [e.token.id for e in free[: len(events)]]


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
async def test_eos_token_finishes_with_eos_reason(
    byte_tokenizer: Any, make_state: Any, overlap: bool
) -> None:
    vocab = len(byte_tokenizer)
    eos = byte_tokenizer.eos_token_id
    # Find a prompt whose fake continuation hits EOS within a few tokens.
    candidates = (char * length for char in "abcdefghij" for length in range(1, 100))
    for prompt in candidates:
        tokens = expected_tokens(byte_tokenizer.encode(prompt), 8, vocab)
        if eos in tokens:
            break
    else:
        pytest.fail("no prompt reaches EOS with the fake model")
    state = make_state(overlap_steps=overlap)
    state.router.start()
    try:
        events = await collect(submit(state, prompt, max_new_tokens=8))
    finally:
        await state.router.stop()
    assert events[-1].finish_reason is FinishReason.EOS_TOKEN
    assert events[-1].token.id == eos and events[-1].token.special
    assert len(events) == tokens.index(eos) + 1


async def test_overloaded_when_max_concurrent_requests_are_in_flight(make_state: Any) -> None:
    state = make_state(max_concurrent_requests=2)
    submit(state, "one", max_new_tokens=2)
    submit(state, "two", max_new_tokens=2)
    with pytest.raises(Overloaded, match="Model is overloaded"):
        submit(state, "three", max_new_tokens=2)
    await state.router.stop()


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
async def test_sixteen_concurrent_mixed_requests_all_complete(
    make_state: Any, byte_tokenizer: Any, overlap: bool
) -> None:
    state = make_state(overlap_steps=overlap)
    backend: FakeBackend = state.router.engine.backend  # type: ignore[attr-defined]
    state.router.start()
    prompts = [f"prompt number {i} " + "x" * (i * 3) for i in range(16)]
    try:
        handles = [submit(state, p, max_new_tokens=4 + i) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(collect(h) for h in handles))
    finally:
        await state.router.stop()
    vocab = len(byte_tokenizer)
    for i, (prompt, events) in enumerate(zip(prompts, results, strict=True)):
        assert [e.token.id for e in events] == expected_tokens(
            byte_tokenizer.encode(prompt), 4 + i, vocab
        )
    assert not backend.kv
    # planned ahead or in turn, every request has exactly its tokens (checked above)
    assert (state.router.overlapped_steps > 0) == overlap


async def test_admission_respects_the_token_budget(make_state: Any) -> None:
    # Each request reserves input + max_new_tokens; the budget fits two at once.
    backend = FakeBackend(vocab_size=300, capacity_tokens=260)
    state = make_state(backend, max_total_tokens=128, max_batch_total_tokens=260)
    state.router.start()
    try:
        handles = [submit(state, "budget", max_new_tokens=120) for _ in range(3)]
        await asyncio.gather(*(collect(h) for h in handles))
    finally:
        await state.router.stop()
    widest = max(len(ids) for method, ids in backend.calls if method == "decode")
    assert widest == 2
