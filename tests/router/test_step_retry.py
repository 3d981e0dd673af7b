"""Isolation: a step that raises does not fail the innocent rows beside the offender.

The rows of a failed multi-row step are recomputed once as suspects, at most one suspect
per step (`Router._admissible`, `EngineCore._blame`); the row that fails again, or
fails alone, gets the error (TGI's 424 `generation`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from tgi.backend.contract import StepOutput, StepPlan
from tgi.errors import BackendError
from tgi.router.request import ErrorEvent, Event, FinalEvent
from tgi.router.router import RequestHandle
from tgi.testing.fake_backend import FakePagedBackend
from tgi.testing.paged import check_drained, make_request, paged_router
from tgi.testing.requests import collect

VOCAB = 64
INNOCENT_PROMPTS = ([5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19])
MAX_NEW_TOKENS = 12


class PoisonedBackend(FakePagedBackend):
    """A paged fake whose step raises when any row feeds `poison` (a token id), or every
    step when `poison` is None; records the rows of each failed step."""

    def __init__(self, vocab_size: int, *, poison: int | None, **values: Any) -> None:
        super().__init__(vocab_size, **values)
        self.poison = poison
        self.failed_rows: list[tuple[int, ...]] = []

    def step(self, plan: StepPlan) -> StepOutput:
        if self.poison is None or any(self.poison in row.input_ids for row in plan.rows):
            self.failed_rows.append(tuple(row.seq_id for row in plan.rows))
            raise BackendError(f"injected failure: token {self.poison} in the step")
        return super().step(plan)


def greedy(prompt: Sequence[int]) -> list[int]:
    from tgi.testing.fake_backend import paged_expected_tokens

    return paged_expected_tokens(prompt, MAX_NEW_TOKENS, VOCAB)


def unused_token() -> int:
    """A token no innocent prompt holds and no innocent greedy output produces."""
    used = {t for prompt in INNOCENT_PROMPTS for t in (*prompt, *greedy(prompt))}
    return min(set(range(VOCAB)) - used)


def token_ids(events: list[Event]) -> list[int]:
    return [event.token.id for event in events if not isinstance(event, ErrorEvent)]


async def run_all(router: Any, prompts: Sequence[Sequence[int]]) -> list[list[Event]]:
    """Queue every prompt before the loop starts (so the first step holds them all),
    then collect each one's events."""
    handles: list[RequestHandle] = [
        router.submit(make_request(prompt, MAX_NEW_TOKENS)) for prompt in prompts
    ]
    router.start()
    try:
        return list(await asyncio.gather(*(collect(handle, 30) for handle in handles)))
    finally:
        await router.stop()


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
async def test_innocent_rows_of_a_failed_step_complete_and_the_offender_fails(
    byte_tokenizer: Any, overlap: bool
) -> None:
    poison = unused_token()
    offender = [20, 21, poison, 22]
    backend = PoisonedBackend(VOCAB, poison=poison, num_blocks=64, block_size=4)
    router = paged_router(backend, byte_tokenizer, max_total_tokens=64, overlap=overlap)
    *innocents, bad = await run_all(router, [*INNOCENT_PROMPTS, offender])

    # the offender shared the first step with all three innocents, and failed it
    assert sorted(backend.failed_rows[0]) == [1, 2, 3, 4]
    for prompt, events in zip(INNOCENT_PROMPTS, innocents, strict=True):
        assert isinstance(events[-1], FinalEvent), events[-1]
        assert token_ids(events) == greedy(prompt)  # as if the offender never came
    assert len(bad) == 1 and isinstance(bad[0], ErrorEvent)
    assert bad[0].message.startswith("Request failed during generation: injected failure")
    assert bad[0].error_type == "generation"
    # retried once, alone among suspects: it failed a second time and no more
    assert len(backend.failed_rows) == 2 and 4 in backend.failed_rows[1]
    assert not backend.kv_usage().seq_ids and not backend.tables
    check_drained(router.policy)
    assert router.engine.stats().num_tracked == 0  # type: ignore[attr-defined]


async def test_an_offender_failing_mid_generation_fails_alone(byte_tokenizer: Any) -> None:
    """It passes its prefill and fails at the decode step that feeds `poison`: the
    requests decoding beside it are recomputed and finish with their own text."""
    poison = unused_token()
    offender = next(
        [30, n] for n in range(VOCAB) if poison in greedy([30, n])[2:-1] and poison not in (30, n)
    )
    backend = PoisonedBackend(VOCAB, poison=poison, num_blocks=64, block_size=4)
    router = paged_router(backend, byte_tokenizer, max_total_tokens=64)
    *innocents, bad = await run_all(router, [*INNOCENT_PROMPTS, offender])

    for prompt, events in zip(INNOCENT_PROMPTS, innocents, strict=True):
        assert isinstance(events[-1], FinalEvent) and token_ids(events) == greedy(prompt)
    assert isinstance(bad[-1], ErrorEvent) and "injected failure" in bad[-1].message
    streamed = token_ids(bad)
    assert streamed == greedy(offender)[: len(streamed)] and poison == streamed[-1]
    assert len(backend.failed_rows) == 2
    assert not backend.kv_usage().seq_ids
    check_drained(router.policy)


async def test_a_backend_that_always_fails_fails_every_request_without_looping(
    byte_tokenizer: Any,
) -> None:
    backend = PoisonedBackend(VOCAB, poison=None, num_blocks=64, block_size=4)
    router = paged_router(backend, byte_tokenizer, max_total_tokens=64)
    results = await run_all(router, [*INNOCENT_PROMPTS, [1, 2, 3]])

    for events in results:
        assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    # the first step fails with all four, then each suspect once, alone among suspects
    assert len(backend.failed_rows) == 5
    assert [len(rows) for rows in backend.failed_rows] == [4, 1, 1, 1, 1]
    assert not backend.kv_usage().seq_ids
    check_drained(router.policy)


async def test_the_offender_gets_tgi_424_over_http(
    make_state: Any, serve_state: Any, byte_tokenizer: Any
) -> None:
    vocab = len(byte_tokenizer)
    texts = ["alpha", "bravo two", "charlie three"]
    params = {"max_new_tokens": MAX_NEW_TOKENS, "details": True}

    async def generate(client: Any, inputs: list[str]) -> list[Any]:
        posts = (client.post("/generate", json={"inputs": i, "parameters": params}) for i in inputs)
        return list(await asyncio.gather(*posts))

    baseline = await generate(await serve_state(make_state(FakePagedBackend(vocab))), texts)
    used = {t["id"] for r in baseline for t in r.json()["details"]["tokens"]}
    used |= {t for text in texts for t in byte_tokenizer.encode(text)}
    poison_char = next(c for c in "~^|`#@$%&*" if byte_tokenizer.encode(c)[-1] not in used)
    poison = byte_tokenizer.encode(poison_char)[-1]
    backend = PoisonedBackend(vocab, poison=poison, num_blocks=64, block_size=4)
    *good, bad = await generate(
        await serve_state(make_state(backend)), [*texts, f"delta {poison_char}"]
    )
    for before, response in zip(baseline, good, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == before.json()["generated_text"]
    assert bad.status_code == 424
    body = bad.json()
    assert body["error_type"] == "generation"
    assert body["error"].startswith("Request failed during generation: injected failure")
    assert backend.failed_rows
    for _ in range(10_000):  # the last release goes with the step after the responses
        if not backend.kv_usage().seq_ids:
            break
        await asyncio.sleep(0)
    assert not backend.kv_usage().seq_ids
