"""What the router sends each step: changes only, one policy interface, hard shapes kept."""

from __future__ import annotations

import asyncio
from typing import Any

from tgi.backend.contract import StepConstraints, StepPlan
from tgi.router.policies import ContinuousPolicy, PolicyLimits
from tgi.router.request import FinalEvent
from tgi.router.router import RequestHandle
from tgi.router.validation import ClientParameters
from tgi.testing.fake_backend import FakeBackend, FakePagedBackend, expected_tokens
from tgi.testing.paged import make_request, paged_router


async def collect(handle: RequestHandle) -> list[Any]:
    async def drain() -> list[Any]:
        return [event async for event in handle.events()]

    return await asyncio.wait_for(drain(), timeout=60)


def submit(state: Any, prompt: str, **params: Any) -> RequestHandle:
    return state.router.submit(state.validator.validate(prompt, ClientParameters(**params)))


async def test_a_steady_decode_plan_carries_no_block_ids(byte_tokenizer: Any) -> None:
    vocab = len(byte_tokenizer)
    backend = FakePagedBackend(vocab, num_blocks=64, block_size=4)
    router = paged_router(backend, byte_tokenizer, max_total_tokens=64)
    router.start()
    try:
        handle = router.submit(make_request([5, 6, 7, 8, 9, 10], 20))
        events = await collect(handle)
    finally:
        await router.stop()
    assert isinstance(events[-1], FinalEvent)
    decode_plans = [p for p in backend.plans if p.running and all(r.decode for r in p.running)]
    assert len(decode_plans) == 19
    crossings = [p for p in decode_plans if p.running[0].new_block_ids]
    # 6 prompt tokens in 2 blocks; decoding positions 6..24 opens blocks at 8, 12, .., 24
    assert len(crossings) == 5
    for plan in decode_plans:
        (row,) = plan.running
        assert len(row.new_block_ids) == (1 if row.start_position % 4 == 0 else 0)
        assert not plan.new and not plan.finished


async def test_a_step_with_a_new_prompt_and_decode_rows_is_one_backend_call(
    make_state: Any, byte_tokenizer: Any
) -> None:
    backend = FakeBackend(vocab_size=len(byte_tokenizer))
    state = make_state(backend)
    state.router.start()
    try:
        first = submit(state, "running already", max_new_tokens=30)
        stream = first.events()
        await stream.__anext__()
        second = await collect(submit(state, "joins", max_new_tokens=4))
        rest = [event async for event in stream]
    finally:
        await state.router.stop()
    assert isinstance(second[-1], FinalEvent) and isinstance(rest[-1], FinalEvent)
    mixed = [p for p in backend.plans if p.new and p.running]
    assert mixed, "the newcomer never joined a step with decode rows"
    (plan,) = mixed[:1]
    assert [row.seq_id for row in plan.new] == [2] and plan.running[0].decode


async def test_admission_keeps_a_backends_hard_batch_buckets(
    make_state: Any, byte_tokenizer: Any
) -> None:
    """The fake raises on any step above its largest bucket; 7 requests over buckets
    (1, 2, 4) must run in steps of at most 4 rows and all finish with their tokens."""
    constraints = StepConstraints(batch_buckets=(1, 2, 4), length_buckets=(16, 32))
    backend = FakeBackend(vocab_size=len(byte_tokenizer), constraints=constraints)
    state = make_state(backend, max_input_tokens=32, max_total_tokens=64)
    state.router.start()
    prompts = [f"bucket {i}" for i in range(7)]
    try:
        handles = [submit(state, p, max_new_tokens=6) for p in prompts]
        results = await asyncio.gather(*(collect(h) for h in handles))
    finally:
        await state.router.stop()
    vocab = len(byte_tokenizer)
    for prompt, events in zip(prompts, results, strict=True):
        assert isinstance(events[-1], FinalEvent), events[-1]
        assert [e.token.id for e in events] == expected_tokens(
            byte_tokenizer.encode(prompt), 6, vocab
        )
    assert max(len(plan.rows) for plan in backend.plans) == 4
    assert state.model.constraints == constraints  # /info shows what warmup declared


def test_the_prefill_budget_counts_prompts_at_their_padded_length() -> None:
    """Two 9-token prompts cost 16 each once padded: a 24-token budget takes one."""
    from tgi.router.sequence import SequenceState

    def policy(constraints: StepConstraints) -> ContinuousPolicy:
        limits = PolicyLimits(
            max_batch_prefill_tokens=24,
            max_batch_total_tokens=1000,
            max_batch_size=None,
            constraints=constraints,
        )
        return ContinuousPolicy(limits, join_immediately=True)

    waiting = [
        SequenceState.create(
            seq_id=seq_id,
            request=make_request(list(range(9)), 4),
            tokenizer=None,  # type: ignore[arg-type]
            eos_token_ids=frozenset(),
            arrival_s=0.0,
        )
        for seq_id in (1, 2)
    ]
    padded = policy(StepConstraints(length_buckets=(8, 16))).schedule([], waiting)
    assert [seq.seq_id for seq in padded.admitted] == [1]
    assert len(policy(StepConstraints()).schedule([], waiting).admitted) == 2


async def test_a_backends_own_policy_plans_the_steps(make_state: Any, byte_tokenizer: Any) -> None:
    """`tgi_scheduling_policy`'s answer replaces the built-in policy, and it alone plans."""
    seen: list[int] = []

    class Counting(ContinuousPolicy):
        def schedule(self, running: Any, waiting: Any) -> Any:
            seen.append(len(running))
            return super().schedule(running, waiting)

    def own(config: Any, capabilities: Any, limits: PolicyLimits, warmup: Any) -> Counting:
        return Counting(limits, join_immediately=True)

    state = make_state(custom_policy=own)
    assert isinstance(state.router.policy, Counting)
    state.router.start()
    try:
        events = await collect(submit(state, "own policy", max_new_tokens=5))
    finally:
        await state.router.stop()
    assert isinstance(events[-1], FinalEvent) and len(seen) >= 5


def test_a_failed_step_keys_no_prefix_block() -> None:
    """The prefix cache keys what a step wrote only when the step succeeded."""
    from tgi.engine.results import StepResult
    from tgi.router.policies import PagedPolicy
    from tgi.router.sequence import SequenceState

    limits = PolicyLimits(
        max_batch_prefill_tokens=64, max_batch_total_tokens=256, max_batch_size=None
    )
    policy = PagedPolicy(
        limits, num_blocks=16, block_size=4, chunked_prefill=True, prefix_caching=True
    )
    request = make_request(list(range(10, 19)), 4)  # 9 tokens: two full blocks
    sequence = SequenceState.create(
        seq_id=1, request=request, tokenizer=None, eos_token_ids=frozenset(), arrival_s=0.0
    )  # type: ignore[arg-type]
    step = policy.schedule([], [sequence])
    sequence.admitted_step = 1
    plan = StepPlan(new=tuple(step.new), step_index=1)
    policy.after_step(plan, StepResult(errors={1: "boom"}))
    assert policy.shared_counts()[1] == 0 and policy.pool.num_evictable == 0
    policy.after_step(plan, StepResult())
    assert policy.shared_counts()[1] == 2


def test_a_recompute_counts_its_generated_tokens_and_must_fit_the_longest_chunk() -> None:
    from tgi.router.request import GeneratedToken
    from tgi.router.sequence import SequenceState

    limits = PolicyLimits(
        max_batch_prefill_tokens=64,
        max_batch_total_tokens=256,
        max_batch_size=None,
        constraints=StepConstraints(max_chunk_tokens=12),
    )
    policy = ContinuousPolicy(limits, join_immediately=True)
    sequence = SequenceState.create(
        seq_id=1,
        request=make_request(list(range(8)), 20),
        tokenizer=None,  # type: ignore[arg-type]
        eos_token_ids=frozenset(),
        arrival_s=0.0,
    )
    assert policy.can_recompute(sequence)
    for token in range(6):
        sequence.tokens.append(GeneratedToken(token, "", 0.0, False))
    assert sequence.num_computed == 8 + 5
    assert not policy.can_recompute(sequence)
    (row,) = policy.schedule([], [sequence]).new
    assert len(row.token_ids) == 13 and not row.want_logits
