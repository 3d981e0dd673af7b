"""The paged policy end to end against `FakePagedBackend`: chunked prefill next to
decode, prefix cache, preemption by recompute, speculation, and a randomized stress test.

The fake backend computes every logit from the token ids it reads back through the
block tables, so any allocator or sharing bug shows up as a wrong token or a
BackendError; `check_pool` runs after every step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import pytest

from tgi.router.request import ErrorEvent, FinalEvent, FinishReason, GenerationRequest
from tgi.router.router import RequestHandle, Router
from tgi.sampling import SamplingParams
from tgi.testing.fake_backend import FakePagedBackend, paged_expected_tokens
from tgi.testing.paged import check_drained, check_pool, make_request, paged_router


def cyclic(tokens: Sequence[int], vocab_size: int) -> int:
    """A model whose output repeats (n-gram drafts get accepted)."""
    return (tokens[-1] * 5 + 3) % 23


def watch(router: Router) -> list[BaseException]:
    """Check the block invariants after every step; failures are collected, not raised
    inside the router's task (where they would only surface as a hang)."""
    errors: list[BaseException] = []
    publish = router._publish_gauges

    def checked() -> None:
        publish()
        try:
            check_pool(router.policy)
        except AssertionError as exc:
            errors.append(exc)

    router._publish_gauges = checked  # type: ignore[method-assign]
    return errors


async def events_of(handle: RequestHandle) -> list[Any]:
    async def drain() -> list[Any]:
        return [event async for event in handle.events()]

    return await asyncio.wait_for(drain(), timeout=60)


def ids(events: list[Any]) -> list[int]:
    return [event.token.id for event in events if not isinstance(event, ErrorEvent)]


async def run_all(router: Router, requests: Sequence[GenerationRequest]) -> list[list[Any]]:
    router.start()
    try:
        handles = [router.submit(request) for request in requests]
        return list(await asyncio.gather(*(events_of(h) for h in handles)))
    finally:
        await router.stop()


def prompts(
    seed: int, count: int, lo: int, hi: int, vocab: int, prefix: int = 0
) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(prefix)]
    return [
        shared + [rng.randrange(vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(count)
    ]


@pytest.fixture
def vocab(byte_tokenizer: Any) -> int:
    return len(byte_tokenizer)


async def test_greedy_tokens_match_the_model_in_a_mixed_batch(
    byte_tokenizer: Any, vocab: int
) -> None:
    backend = FakePagedBackend(vocab, num_blocks=64, block_size=4)
    router = paged_router(backend, byte_tokenizer, max_batch_prefill_tokens=32)
    errors = watch(router)
    batch = prompts(1, 6, 1, 20, vocab)
    outs = await run_all(router, [make_request(p, 12) for p in batch])
    assert [ids(o) for o in outs] == [paged_expected_tokens(p, 12, vocab) for p in batch]
    assert all(isinstance(o[-1], FinalEvent) for o in outs)
    assert outs[0][-1].finish_reason is FinishReason.LENGTH
    assert not errors
    check_drained(router.policy)
    assert sorted(backend.released) == sorted(range(1, 7))


async def test_long_prompt_is_chunked_while_others_keep_decoding(
    byte_tokenizer: Any, vocab: int
) -> None:
    backend = FakePagedBackend(vocab, num_blocks=64, block_size=4)
    router = paged_router(backend, byte_tokenizer, max_batch_prefill_tokens=8)
    errors = watch(router)
    short, long = prompts(2, 2, 3, 4, vocab)[0], prompts(3, 1, 40, 41, vocab)[0]
    router.start()
    try:
        first = router.submit(make_request(short, 30))
        stream = first.events()
        head = [await stream.__anext__() for _ in range(2)]  # it is decoding now
        second = router.submit(make_request(long, 5))
        long_events = await events_of(second)
        short_events = head + [event async for event in stream]
    finally:
        await router.stop()
    assert ids(short_events) == paged_expected_tokens(short, 30, vocab)
    assert ids(long_events) == paged_expected_tokens(long, 5, vocab)
    chunks = [row for rows in backend.prefill_rows for row in rows if row[0] == second.seq_id]
    assert [(start, n, logits) for _, start, n, logits in chunks] == [
        (0, 8, False),
        (8, 8, False),
        (16, 8, False),
        (24, 8, False),
        (32, 8, True),
    ]
    # every step that ran a chunk of the long prompt also decoded the short request
    for index, (method, seq_ids) in enumerate(backend.calls):
        if method == "prefill" and second.seq_id in seq_ids:
            assert backend.calls[index + 1] == ("decode", (first.seq_id,))
    assert not errors
    check_drained(router.policy)


async def test_prefix_cache_skips_a_repeated_system_prompt(byte_tokenizer: Any, vocab: int) -> None:
    batch = prompts(4, 5, 1, 6, vocab, prefix=21)  # 5 full blocks of 4 shared

    async def one_by_one(router: Router) -> list[list[int]]:
        router.start()
        try:  # one after the other: each finds the previous one's blocks
            return [ids(await events_of(router.submit(make_request(p, 6)))) for p in batch]
        finally:
            await router.stop()

    cached = FakePagedBackend(vocab, num_blocks=64, block_size=4)
    router = paged_router(cached, byte_tokenizer)
    errors = watch(router)
    assert await one_by_one(router) == [paged_expected_tokens(p, 6, vocab) for p in batch]
    total = sum(len(p) for p in batch)
    assert cached.prefill_tokens == total - 4 * 20
    metrics = router._metrics
    assert metrics.prefix_cache_hit_tokens._value.get() == 4 * 20
    assert metrics.prefix_cache_queried_tokens._value.get() == total
    assert not errors
    check_drained(router.policy)

    uncached = FakePagedBackend(vocab, num_blocks=64, block_size=4)
    plain = paged_router(uncached, byte_tokenizer, prefix_caching=False)
    assert await one_by_one(plain) == [paged_expected_tokens(p, 6, vocab) for p in batch]
    assert uncached.prefill_tokens == total


async def test_prompt_logits_rows_bypass_the_cache_and_are_not_chunked(
    byte_tokenizer: Any, vocab: int
) -> None:
    backend = FakePagedBackend(vocab, num_blocks=64, block_size=4)
    router = paged_router(backend, byte_tokenizer, max_batch_prefill_tokens=8)
    prompt = prompts(5, 1, 13, 14, vocab)[0]
    outs = await run_all(
        router,
        [make_request(prompt, 3), make_request(prompt, 3, decoder_input_details=True)],
    )
    final = outs[1][-1]
    assert isinstance(final, FinalEvent) and len(final.prefill) == len(prompt)
    assert ids(outs[1]) == paged_expected_tokens(prompt, 3, vocab)
    rows = [row for rows in backend.prefill_rows for row in rows if row[0] == 2]
    assert rows == [(2, 0, 13, True)]


@pytest.mark.parametrize("do_sample", [False, True])
async def test_preemption_gives_the_tokens_of_an_unconstrained_run(
    byte_tokenizer: Any, vocab: int, do_sample: bool
) -> None:
    batch = prompts(6, 8, 5, 15, vocab)
    sampling = SamplingParams(do_sample=do_sample, seed=7, temperature=0.7, top_k=20)
    requests = [make_request(p, 24, sampling=sampling) for p in batch]
    roomy = paged_router(FakePagedBackend(vocab, num_blocks=256, block_size=4), byte_tokenizer)
    want = [ids(o) for o in await run_all(roomy, requests)]
    tight_backend = FakePagedBackend(vocab, num_blocks=12, block_size=4)  # one seq: <= 10
    tight = paged_router(tight_backend, byte_tokenizer, max_batch_prefill_tokens=16)
    errors = watch(tight)
    got = [ids(o) for o in await run_all(tight, requests)]
    assert got == want
    if not do_sample:
        assert got == [paged_expected_tokens(p, 24, vocab) for p in batch]
    assert tight._metrics.preemptions._value.get() > 0
    assert not errors
    check_drained(tight.policy)


async def test_cancelling_a_preempted_request_forgets_it(byte_tokenizer: Any, vocab: int) -> None:
    backend = FakePagedBackend(vocab, num_blocks=10, block_size=4)
    router = paged_router(backend, byte_tokenizer)
    errors = watch(router)
    batch = prompts(7, 4, 8, 9, vocab)
    router.start()
    try:
        handles = [router.submit(make_request(p, 28)) for p in batch]
        for _ in range(10_000):
            if router._metrics.preemptions._value.get():
                break
            await asyncio.sleep(0)
        victims = [h for h in handles if h._sequence in router._waiting and h._sequence.tokens]
        assert victims, "nothing was preempted"
        victims[0].cancel()
        rest = [h for h in handles if h is not victims[0]]
        outs = await asyncio.gather(*(events_of(h) for h in rest))
    finally:
        await router.stop()
    for handle, out in zip(rest, outs, strict=True):
        prompt = batch[handles.index(handle)]
        assert ids(out) == paged_expected_tokens(prompt, 28, vocab)
    assert router.engine.core._sampler.num_histories == 0
    assert not errors
    check_drained(router.policy)


async def test_speculation_output_is_identical_and_saves_steps(
    byte_tokenizer: Any, vocab: int
) -> None:
    batch = prompts(8, 4, 3, 9, vocab)
    greedy = SamplingParams()
    seeded = SamplingParams(do_sample=True, seed=3, top_k=5)
    requests = [
        make_request(p, 30, sampling=greedy if i % 2 else seeded) for i, p in enumerate(batch)
    ]
    requests.append(make_request(batch[0], 30, sampling=SamplingParams(repetition_penalty=1.3)))

    async def run(speculate: int) -> tuple[list[list[int]], FakePagedBackend, Router]:
        backend = FakePagedBackend(vocab, num_blocks=128, block_size=4, next_token=cyclic)
        router = paged_router(backend, byte_tokenizer, speculate=speculate)
        errors = watch(router)
        out = [ids(o) for o in await run_all(router, requests)]
        assert not errors
        check_drained(router.policy)
        return out, backend, router

    plain, plain_backend, _ = await run(0)
    spec, spec_backend, router = await run(2)
    assert spec == plain
    assert plain[1] == paged_expected_tokens(batch[1], 30, vocab, cyclic)
    assert max(spec_backend.decode_widths) == 3

    def steps_of(backend: FakePagedBackend, seq_id: int) -> int:
        return sum(1 for method, seq_ids in backend.calls if seq_id in seq_ids)

    assert steps_of(spec_backend, 2) < 0.6 * steps_of(plain_backend, 2)  # greedy, drafted
    assert steps_of(spec_backend, 5) == steps_of(plain_backend, 5)  # penalty: never drafted
    accepted = router._metrics.speculative_accepted_tokens._value.get()
    assert 0 < accepted <= router._metrics.speculative_draft_tokens._value.get()


async def test_speculation_stops_exactly_at_eos_and_max_new_tokens(
    byte_tokenizer: Any, vocab: int
) -> None:
    prompt = [4, 9, 4, 9]
    expected = paged_expected_tokens(prompt, 40, vocab, cyclic)
    eos = expected[17]
    outs = {}
    for speculate in (0, 3):
        backend = FakePagedBackend(vocab, num_blocks=64, block_size=4, next_token=cyclic)
        router = paged_router(
            backend, byte_tokenizer, speculate=speculate, eos_token_ids=frozenset({eos})
        )
        outs[speculate] = await run_all(router, [make_request(prompt, 40), make_request(prompt, 7)])
    for speculate, (to_eos, to_length) in outs.items():
        assert ids(to_eos) == expected[: expected.index(eos) + 1], speculate
        assert to_eos[-1].finish_reason is FinishReason.EOS_TOKEN
        assert ids(to_length) == expected[:7]
        assert to_length[-1].finish_reason is FinishReason.LENGTH
        assert [e.index for e in to_length] == list(range(1, 8))


async def _stress(
    byte_tokenizer: Any,
    vocab: int,
    *,
    seed: int,
    num_requests: int,
    num_blocks: int,
    overlap: bool = False,
) -> None:
    """Random arrivals, shared prefixes and cancellations; with `overlap` the router plans
    ahead (no speculation then, and a roomier pool, so it may), else speculation on a
    pool tight enough to preempt."""
    rng = random.Random(seed)
    block_size = 4
    # planned ahead, decode rows feed on the step before's tokens while they land
    backend = FakePagedBackend(
        vocab, num_blocks=num_blocks, block_size=block_size, fed_tokens=overlap
    )
    router = paged_router(
        backend,
        byte_tokenizer,
        max_batch_prefill_tokens=rng.choice([8, 16, 32]),
        speculate=0 if overlap else 2,
        max_batch_size=rng.choice([None, 6]),
        overlap=overlap,
        keep_in_flight=overlap,  # as on a GPU: the next forward before this step lands
    )
    errors = watch(router)
    systems = [[rng.randrange(vocab) for _ in range(rng.randrange(4, 12))] for _ in range(3)]
    router.start()
    tasks: list[tuple[list[int], int, bool, asyncio.Task[list[Any]]]] = []

    async def consume(handle: RequestHandle, cancel_after: int | None) -> list[Any]:
        got: list[Any] = []
        async for event in handle.events():
            got.append(event)
            if cancel_after is not None and len(got) >= cancel_after:
                break  # the client goes away: the generator's finally cancels it
        return got

    try:
        for _ in range(num_requests):
            prefix = rng.choice(systems) if rng.random() < 0.5 else []
            prompt = prefix + [rng.randrange(vocab) for _ in range(rng.randrange(1, 16))]
            max_new = rng.randrange(1, 20)
            cancel_after = rng.randrange(0, max_new) if rng.random() < 0.15 else None
            handle = router.submit(make_request(prompt, max_new))
            task = asyncio.ensure_future(consume(handle, cancel_after))
            tasks.append((prompt, max_new, cancel_after is not None, task))
            for _ in range(rng.randrange(0, 4)):
                await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*(t for *_, t in tasks)), timeout=120)
        for _ in range(1000):  # let the last releases run
            if not router._running and not router._to_release:
                break
            await asyncio.sleep(0)
    finally:
        await router.stop()
    assert not errors, errors[0]
    for prompt, max_new, cancelled, task in tasks:
        events = task.result()
        if cancelled:
            assert ids(events) == paged_expected_tokens(prompt, max_new, vocab)[: len(events)]
            continue
        assert isinstance(events[-1], FinalEvent), events[-1]
        assert ids(events) == paged_expected_tokens(prompt, max_new, vocab)
    check_drained(router.policy)
    assert backend.kv_usage().seq_ids == frozenset()
    assert router.engine.core._sampler.num_histories == 0
    metrics = router._metrics
    assert metrics.prefix_cache_hit_tokens._value.get() > 0, "no prefix was ever shared"
    if overlap:
        assert router.overlapped_steps > 0, "no step was ever planned ahead"
        assert backend.fed_rows > 0, "no step ever ran before the one before landed"
    else:
        assert metrics.preemptions._value.get() > 0, "the pool was never tight"


async def test_randomized_arrivals_cancellations_and_preemptions(
    byte_tokenizer: Any, vocab: int
) -> None:
    await _stress(byte_tokenizer, vocab, seed=11, num_requests=120, num_blocks=14)


async def test_randomized_arrivals_with_steps_planned_ahead(
    byte_tokenizer: Any, vocab: int
) -> None:
    await _stress(byte_tokenizer, vocab, seed=12, num_requests=120, num_blocks=64, overlap=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
async def test_randomized_stress_large(byte_tokenizer: Any, vocab: int, seed: int) -> None:
    await _stress(byte_tokenizer, vocab, seed=seed, num_requests=1000, num_blocks=24)


async def test_launcher_picks_the_paged_policy_for_a_paged_backend(
    make_state: Any, byte_tokenizer: Any, vocab: int
) -> None:
    from tgi.metrics import exposition
    from tgi.router.policies import PagedPolicy
    from tgi.router.validation import ClientParameters

    backend = FakePagedBackend(vocab, num_blocks=200, block_size=4)
    state = make_state(backend, speculate=2, max_batch_total_tokens=400)
    policy = state.router._policy
    assert isinstance(policy, PagedPolicy)
    assert policy.pool.num_blocks == 100  # capped by --max-batch-total-tokens
    assert policy.speculate == 2 and policy.prefix_caching and policy.chunked_prefill
    state.router.start()
    try:
        request = state.validator.validate("hello paged", ClientParameters(max_new_tokens=5))
        events = await events_of(state.router.submit(request))
    finally:
        await state.router.stop()
    prompt = byte_tokenizer.encode("hello paged")
    assert ids(events) == paged_expected_tokens(prompt, 5, vocab)
    text = exposition(state.metrics.registry).decode()
    for name in (
        "tgi_prefix_cache_hit_tokens",
        "tgi_prefix_cache_queried_tokens",
        "tgi_request_preemption",
        "tgi_kv_cache_blocks_used",
        "tgi_kv_cache_blocks_free",
    ):
        assert f"\n{name} " in text, name
    assert "tgi_kv_cache_blocks_free 100" in text


def test_launcher_refuses_a_pool_smaller_than_one_sequence(make_state: Any, vocab: int) -> None:
    from tgi.errors import BackendError

    with pytest.raises(BackendError, match="cannot hold one sequence"):
        make_state(  # 255 tokens are 15 whole blocks of 16: 240 < 250
            FakePagedBackend(vocab, num_blocks=64, block_size=16),
            max_total_tokens=250,
            max_batch_total_tokens=255,
        )


@pytest.mark.slow
@pytest.mark.smollm2
async def test_real_paged_cpu_engine_output_does_not_depend_on_the_policy() -> None:
    """SmolLM2 on the CPU paged engine: chunked prefill, prefix cache, a pool small
    enough to preempt and speculation all give the tokens of the plain run."""
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from tgi.errors import ModelNotFound
    from tgi.testing.fixtures import smollm2_files

    paged = pytest.importorskip("tgi_backend_cpu.paged")
    try:
        files = smollm2_files(Path(__file__).parents[2] / ".cache" / "tgi-test")
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    tokenizer = AutoTokenizer.from_pretrained(files.path)
    system = tokenizer.encode("You are a helpful assistant. Answer briefly and precisely. " * 3)
    questions = ["What is the capital of France?", "def fib(n):", "1, 2, 3, 4,", "The fox"]
    requests = [make_request(system + tokenizer.encode(q), 24) for q in questions]

    async def run(**options: Any) -> list[list[int]]:
        backend = paged.PagedCpuBackend(files.path, dtype=torch.float32)
        router = paged_router(backend, tokenizer, max_total_tokens=128, **options)
        out = [ids(o) for o in await run_all(router, requests)]
        check_drained(router.policy)
        if options.get("max_batch_total_tokens"):
            assert router._metrics.preemptions._value.get() > 0
        return out

    plain = await run(prefix_caching=False)
    assert await run(max_batch_prefill_tokens=32, speculate=3) == plain
    tight = {"max_batch_total_tokens": 160, "prefix_caching": False, "speculate": 2}
    assert await run(max_batch_prefill_tokens=48, **tight) == plain


async def test_the_latest_admitted_row_is_preempted_and_resumes_first(
    byte_tokenizer: Any, vocab: int
) -> None:
    backend = FakePagedBackend(vocab, num_blocks=6, block_size=4)
    router = paged_router(backend, byte_tokenizer)
    batch = prompts(9, 3, 4, 5, vocab)
    handles = [router.submit(make_request(p, 12)) for p in batch]
    seen_preemption = False
    for _ in range(200):
        running_before = list(router._running)
        before = router._metrics.preemptions._value.get()
        await router._step()
        check_pool(router.policy)
        if router._metrics.preemptions._value.get() > before:
            seen_preemption = True
            victim = router._waiting[0]
            assert victim.seq_id == running_before[-1]  # the most recently admitted
            assert victim.tokens, "a decoding row was preempted, with its tokens kept"
            assert victim.seq_id not in backend.shadow  # its KV is released
        if not router._running and not router._waiting:
            break
    assert seen_preemption
    for handle, prompt in zip(handles, batch, strict=True):
        assert ids(await events_of(handle)) == paged_expected_tokens(prompt, 12, vocab)
    await router.stop()
    check_drained(router.policy)
